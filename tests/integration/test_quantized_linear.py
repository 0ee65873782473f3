import copy
import math

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from altgrad.integration import (
    STAT_FIELDS,
    LayerQuantSpec,
    QuantizedLinear,
    QuantPlan,
    QuantRule,
    dequantize_model,
    full_precision_forward,
    quantize_model,
    quantized_layers,
)
from altgrad.quantization import E3M4, E4M3, E5M2, quantize
from altgrad.quantization.scaling import compute_scale, mx_block_scale, mx_quantize
from altgrad.training.model import GPT, GPTConfig


def _layer(spec: LayerQuantSpec, seed: int = 0) -> tuple[nn.Linear, QuantizedLinear]:
    torch.manual_seed(seed)
    linear = nn.Linear(16, 8)
    return linear, QuantizedLinear(linear, spec)


def test_forward_is_linear_of_quantized_input_and_weight():
    linear, layer = _layer(LayerQuantSpec(weight=E4M3, activation=E3M4, scaling="current"))
    x = torch.randn(4, 16)
    w_scale = compute_scale(linear.weight.detach().abs().amax(), E4M3)
    x_scale = compute_scale(x.abs().amax(), E3M4)
    expected = F.linear(quantize(x, E3M4, x_scale), quantize(linear.weight, E4M3, w_scale), linear.bias)
    assert torch.equal(layer(x), expected)


def test_input_gradient_uses_the_quantized_weight_of_the_forward():
    linear, layer = _layer(LayerQuantSpec(weight=E4M3, scaling="current"))
    x = torch.randn(4, 16, requires_grad=True)
    upstream = torch.randn(4, 8)
    layer(x).backward(upstream)

    w_q = quantize(linear.weight.detach(), E4M3, compute_scale(linear.weight.detach().abs().amax(), E4M3))
    reference = nn.Linear(16, 8)
    reference.weight.data.copy_(w_q)
    reference.bias.data.copy_(linear.bias.detach())
    x_ref = x.detach().clone().requires_grad_(True)
    reference(x_ref).backward(upstream)
    assert torch.equal(x.grad, x_ref.grad)
    # straight-through: the weight gradient is that of the quantized forward, passed to the fp32 weight
    assert torch.equal(linear.weight.grad, reference.weight.grad)


def test_output_gradient_is_quantized_in_the_grad_format():
    linear, layer = _layer(LayerQuantSpec(grad=E5M2, scaling="current"))
    x = torch.randn(4, 16, requires_grad=True)
    upstream = torch.randn(4, 8) * 1e-3
    layer(x).backward(upstream)
    g_q = quantize(upstream, E5M2, compute_scale(upstream.abs().amax(), E5M2))
    assert not torch.equal(g_q, upstream)
    assert torch.allclose(x.grad, g_q @ linear.weight.detach(), rtol=0, atol=1e-7)


def test_delayed_scaling_uses_earlier_amax_and_counts_overflow():
    _, layer = _layer(LayerQuantSpec(activation=E4M3, scaling="delayed"))
    layer.collect_stats = True
    layer(torch.full((2, 16), 1.0))  # history: amax 1
    layer(torch.full((2, 16), 4.0))  # scale from amax 1: 4 / (1 / 448) overflows
    stats = layer.read_stats()
    activation = stats[1]
    assert activation[0].item() == 32  # overflowed elements (second call)
    assert activation[3].item() == 64  # elements seen
    assert torch.equal(layer.read_stats(), torch.zeros(3, len(STAT_FIELDS)))  # read_stats resets


def test_underflow_is_counted():
    _, layer = _layer(LayerQuantSpec(activation=E4M3, scaling="current"))
    layer.collect_stats = True
    x = torch.zeros(1, 16)
    x[0, 0], x[0, 1] = 1.0, 1e-9  # 1e-9 flushes to zero at the scale set by 1.0
    layer(x)
    assert layer.read_stats()[1, 1].item() == 1


@pytest.mark.parametrize("scaling", ["per_channel", "mx"])
def test_other_scalings_run_and_stay_close(scaling):
    torch.manual_seed(0)
    linear = nn.Linear(64, 40)  # 40 outputs: the MX gradient blocks do not divide evenly
    layer = QuantizedLinear(linear, LayerQuantSpec(weight=E4M3, activation=E4M3, grad=E5M2, scaling=scaling))
    x = torch.randn(4, 64, requires_grad=True)
    y = layer(x)
    assert torch.allclose(y, linear(x), rtol=0.1, atol=0.1)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert layer.weight_scale().shape in {torch.Size([40, 1]), torch.Size([40, 64])}


def test_mx_weight_uses_its_block_scales():
    torch.manual_seed(0)
    linear = nn.Linear(64, 8, bias=False)
    layer = QuantizedLinear(linear, LayerQuantSpec(weight=E4M3, scaling="mx"))
    w_q = layer(torch.eye(64))  # = W_q^T
    expected, _ = mx_quantize(linear.weight.detach(), E4M3)
    assert torch.equal(w_q.T, expected)
    scale = layer.weight_scale()
    assert scale.shape == linear.weight.shape
    assert torch.equal(scale[:, :32], mx_block_scale(linear.weight.detach(), E4M3)[:, :1].expand(8, 32))


def _tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=16, dropout=0.0))


def test_quantize_model_rules_match_intended_layers_and_later_rules_win():
    model = _tiny_gpt()
    plan = QuantPlan(
        weight="E4M3",
        activation="E4M3",
        grad="E5M2",
        rules=[
            QuantRule("*.attn.c_proj", weight="bfloat16", activation="none"),
            QuantRule("lm_head", weight="none", activation="none", grad="none"),
            QuantRule("transformer.h.1.attn.c_proj", weight="E3M4"),
        ],
    )
    report = quantize_model(model, plan)
    layers = quantized_layers(model)
    assert "lm_head" not in layers and isinstance(model.lm_head, nn.Linear)
    assert layers["transformer.h.0.attn.c_proj"].spec.weight.name == "bfloat16"
    assert layers["transformer.h.0.attn.c_proj"].spec.activation is None
    assert layers["transformer.h.1.attn.c_proj"].spec.weight is E3M4  # the later rule wins
    assert layers["transformer.h.1.attn.c_proj"].spec.activation is None  # kept from the earlier rule
    assert layers["transformer.h.0.mlp.c_fc"].spec.weight is E4M3
    assert report.unmatched_rules == []
    assert set(layers) == {
        f"transformer.h.{i}.{m}"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }


def test_rule_matching_nothing_warns():
    with pytest.warns(UserWarning, match="matched no Linear"):
        report = quantize_model(
            _tiny_gpt(), QuantPlan(weight="E4M3", rules=[QuantRule("*.nothing", weight="E3M4")])
        )
    assert report.unmatched_rules == ["*.nothing"]


def test_tied_weights_stay_tied_and_dequantize_restores_linears():
    model = _tiny_gpt()
    quantize_model(model, QuantPlan(weight="E4M3", activation="E4M3", grad="E5M2"))
    assert isinstance(model.lm_head, QuantizedLinear)
    assert model.lm_head.weight is model.transformer.wte.weight
    x = torch.randint(11, (2, 8))
    _, loss = model(x, x)
    loss.backward()
    assert model.transformer.wte.weight.grad is not None
    dequantize_model(model)
    assert not quantized_layers(model)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight


def test_set_format_switches_the_weight_grid():
    _, layer = _layer(LayerQuantSpec(weight=E4M3, scaling="current"))
    layer.set_format("weight", E3M4)
    assert layer.weight_format is E3M4
    with pytest.raises(ValueError, match="kind"):
        layer.set_format("bias", E3M4)


def _stat(layer: QuantizedLinear, kind: str, field: str) -> float:
    return float(layer.quant_stats[("weight", "activation", "grad").index(kind), STAT_FIELDS.index(field)])


@pytest.mark.parametrize("scaling", ["current", "mx"])
def test_rel_error_matches_ml_dtypes_rounding(scaling):
    """||Q(x) - x|| / ||x|| per kind, against numpy rounding through ml_dtypes.float8_e4m3fn at the same
    scales (float64 sums); the gradient's error from the upstream gradient the layer quantized."""
    torch.manual_seed(1)
    linear = nn.Linear(64, 8)
    layer = QuantizedLinear(linear, LayerQuantSpec(weight=E4M3, activation=E4M3, grad=E4M3, scaling=scaling))
    layer.collect_stats = True
    x, upstream = torch.randn(4, 64), torch.randn(4, 8) * 1e-3
    layer(x).backward(upstream)

    def reference(values: torch.Tensor, kind: str) -> float:
        v = values.detach().double().numpy()
        if scaling == "mx":
            scale = mx_block_scale(values.detach(), E4M3, 32).repeat_interleave(32, dim=-1)
            scale = scale[..., : v.shape[-1]].double().numpy()
        else:
            scale = layer.quantizers[kind].last_scale.double().numpy()
        saturated = np.clip(v / scale, -448.0, 448.0)  # the layer's overflow policy: saturate
        q = saturated.astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * scale
        return float(np.sqrt(((q - v) ** 2).sum() / (v**2).sum()))

    for kind, values in (("weight", linear.weight), ("activation", x), ("grad", upstream)):
        measured = math.sqrt(_stat(layer, kind, "sum_sq_error") / _stat(layer, kind, "sum_sq"))
        assert measured == pytest.approx(reference(values, kind), rel=1e-5), kind
        assert 0.005 < measured < 0.1  # E4M3 rounds to about 2^-4 relative: not zero, not gross


def test_nonfinite_counts_inputs_and_outputs_and_error_sums_skip_them():
    _, layer = _layer(LayerQuantSpec(activation=E4M3, scaling="current"))
    layer.collect_stats = True
    x = torch.ones(1, 16)
    x[0, 0], x[0, 1] = float("nan"), 3.0
    layer(x)
    assert _stat(layer, "activation", "nonfinite") == 1
    assert _stat(layer, "activation", "sum_sq") == 15 - 1 + 9  # the NaN element is left out


def test_compiled_kernels_reach_every_quantizer(monkeypatch):
    """compiled_kernels: per-tensor nearest rounding goes through the fused kernel (weight, activation,
    then the gradient in the backward); what it cannot take, through quantize(..., compiled=True)."""
    import altgrad.integration.quantized_linear as module

    fused_calls = []

    def fake_fused(x, fmt, margin, rounding, history, algo, record, codes):
        fused_calls.append(fmt.name)
        amax = x.detach().abs().amax()
        if record:
            history.update(amax)
        return module.fused.FusedResult(x.detach().clone(), torch.ones(()), amax, None)

    monkeypatch.setattr(module.fused, "scale_and_quantize", fake_fused)
    _, layer = _layer(LayerQuantSpec(weight=E4M3, activation=E4M3, grad=E5M2))
    layer.compiled_kernels = True
    assert layer.compiled_kernels and all(q.compiled for q in layer.quantizers.values())
    layer(torch.randn(3, 16, requires_grad=True)).sum().backward()
    assert fused_calls == ["E4M3", "E4M3", "E5M2"]
    assert all(len(q.history) == 1 for q in layer.quantizers.values())  # delayed scaling recorded the amax

    asked = []
    monkeypatch.setattr(module, "quantize", lambda *args, compiled, **kw: asked.append(compiled) or args[0])
    _, layer = _layer(LayerQuantSpec(weight=E4M3, activation=E4M3, grad=E5M2, rounding="stochastic"))
    layer.compiled_kernels = True
    layer(torch.randn(3, 16, requires_grad=True)).sum().backward()
    assert asked == [True, True, True] and len(fused_calls) == 3


@pytest.mark.parametrize(
    ("rounding", "scaling"), [("nearest", "delayed"), ("nearest", "current"), ("stochastic", "delayed")]
)
def test_compiled_kernels_train_bit_for_bit_like_eager(rounding, scaling, monkeypatch):
    """Five AdamW steps of a quantized GPT: the same losses, weights, amax histories, weight codes (a
    flip tracker's) and quant statistics with compiled kernels as eager (the model around them stays
    eager). Nearest rounding takes the fused kernel; stochastic rounding on a CPU stays eager."""
    import altgrad.integration.quantized_linear as module

    computed = []
    real = module.fused.scale_and_quantize
    monkeypatch.setattr(
        module.fused, "scale_and_quantize", lambda *a, **k: computed.append(real(*a, **k)) or computed[-1]
    )
    plan = QuantPlan(weight="E4M3", activation="E3M4", grad="E5M2", rounding=rounding, scaling=scaling)
    x = torch.randint(11, (4, 8), generator=torch.Generator().manual_seed(1))
    runs = []
    for compiled in (False, True):
        model = _tiny_gpt()
        quantize_model(model, plan)
        layers = quantized_layers(model).values()
        for layer in layers:
            layer.compiled_kernels = compiled
            layer.keep_weight_codes = True
            for quantizer in layer.quantizers.values():
                quantizer.generator = torch.Generator().manual_seed(7)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses, codes = [], []
        for step in range(5):
            for layer in layers:
                layer.collect_stats = step == 3
            _, loss = model(x, x)
            loss.backward()
            codes += [layer.take_weight_codes() for layer in layers]
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        histories = [q.history.history for layer in layers for q in layer.quantizers.values()]
        stats = [layer.read_stats() for layer in layers]
        runs.append((torch.stack(losses), list(model.parameters()), histories, codes, stats))
    (eager_losses, eager_weights, eager_histories, eager_codes, eager_stats) = runs[0]
    losses, weights, histories, codes, stats = runs[1]
    assert torch.equal(losses, eager_losses)
    assert all(
        torch.equal(a.view(torch.int32), b.view(torch.int32))
        for a, b in zip(weights, eager_weights, strict=True)
    )
    assert all(torch.equal(a, b) for a, b in zip(histories, eager_histories, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(stats, eager_stats, strict=True))
    if rounding == "nearest":  # the fused kernel computed every call (no fallback to eager)
        assert computed and all(result is not None for result in computed)
    else:
        assert not computed
    if rounding == "nearest":  # E4M3 is native: the eager path keeps codes too
        assert all(a is not None and torch.equal(a, b) for a, b in zip(codes, eager_codes, strict=True))
    else:
        assert all(a is None and b is None for a, b in zip(codes, eager_codes, strict=True))


def test_full_precision_forward_is_the_unquantized_model():
    """Bypassing the quantizers gives the loss of the same weights in plain nn.Linear layers, bit for bit,
    and touches no statistics."""
    model = _tiny_gpt()
    quantize_model(model, QuantPlan(weight="E3M4", activation="E3M4", grad="E5M2"))
    layers = quantized_layers(model)
    x = torch.randint(11, (2, 8))
    model.eval()
    _, quantized_loss = model(x, x)
    for layer in layers.values():
        layer.collect_stats = True
    with full_precision_forward(model):
        _, bypassed = model(x, x)
    assert all(not layer.quant_stats.any() for layer in layers.values())
    assert not any(layer.full_precision for layer in layers.values())
    plain = copy.deepcopy(model)
    dequantize_model(plain)
    _, reference = plain(x, x)
    assert torch.equal(bypassed, reference)
    assert not torch.equal(bypassed, quantized_loss)
