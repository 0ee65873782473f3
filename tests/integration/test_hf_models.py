"""quantize_model on Hugging Face models built from tiny configs (random init, no network).

GPT-2's blocks use transformers' Conv1D (weight stored (in, out)); Llama's use nn.Linear. The
references are independent of altgrad: ml_dtypes rounding with a numpy-computed scale, and the
unmodified model's own forward.
"""

import copy
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from altgrad.diagnostics.flips import WeightFlipTracker  # noqa: E402
from altgrad.integration import (  # noqa: E402
    LayerQuantSpec,
    QuantizedLinear,
    QuantPlan,
    dequantize_model,
    quantize_model,
    quantized_layers,
)
from altgrad.quantization import E4M3  # noqa: E402

VOCAB = 64
GPT2_BLOCK_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LLAMA_BLOCK_LAYERS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


FULL_PLAN = QuantPlan(weight="E4M3", activation="E4M3", grad="E5M2")


def test_gpt2_every_conv1d_is_swapped_keeping_its_parameters_and_the_tie():
    model = tiny_gpt2()
    params_before = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = quantize_model(model, FULL_PLAN)
    assert not [w for w in caught if "quantize_model" in str(w.message)]  # only embeddings were left
    expected = {f"transformer.h.{i}.{layer}" for i in range(2) for layer in GPT2_BLOCK_LAYERS} | {"lm_head"}
    assert set(quantized_layers(model)) == expected == set(report.layers)
    assert report.skipped == {"transformer.wte": "Embedding", "transformer.wpe": "Embedding"}
    for name, p in model.named_parameters(remove_duplicate=False):
        assert p is params_before[name], name
    assert model.lm_head.weight is model.transformer.wte.weight
    c_fc = model.transformer.h[0].mlp.c_fc
    assert c_fc.transposed and (c_fc.in_features, c_fc.out_features) == (32, 128)
    assert c_fc.weight.shape == (32, 128)  # the stored (in, out) layout is kept (save_pretrained stays valid)


def test_llama_every_linear_is_swapped():
    model = tiny_llama()
    report = quantize_model(model, FULL_PLAN)
    expected = {f"model.layers.{i}.{layer}" for i in range(2) for layer in LLAMA_BLOCK_LAYERS} | {"lm_head"}
    assert set(quantized_layers(model)) == expected
    assert report.skipped == {"model.embed_tokens": "Embedding"}
    assert not any(layer.transposed for layer in quantized_layers(model).values())


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_layers_without_formats_compute_the_unquantized_forward(build):
    model = build()
    ids = _ids()
    expected = _logits(model, ids)
    for name, module in list(model.named_modules()):
        if type(module) in (nn.Linear, Conv1D):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QuantizedLinear(module, LayerQuantSpec()))
    assert len(quantized_layers(model)) > 0
    torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-6, atol=1e-6)


def _e4m3_reference(weight: torch.Tensor) -> torch.Tensor:
    """Per-tensor current scaling, by numpy and ml_dtypes: Q(W / s) * s with s = amax / 448."""
    w = weight.detach().numpy().astype(np.float32)
    scale = np.float32(np.abs(w).max()) / np.float32(448.0)
    rounded = (w / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
    return torch.from_numpy(rounded)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_weight_quantized_forward_matches_an_ml_dtypes_reference(build):
    model = build()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for module in reference.modules():
            if type(module) in (nn.Linear, Conv1D):
                module.weight.copy_(_e4m3_reference(module.weight))  # tied wte gets the lm_head grid too
    quantize_model(model, QuantPlan(weight="E4M3", scaling="current"))
    if hasattr(model, "transformer"):  # the tied embedding is looked up in full precision
        reference.transformer.wte.weight = nn.Parameter(model.transformer.wte.weight.detach().clone())
        reference.lm_head.weight = nn.Parameter(_e4m3_reference(model.transformer.wte.weight))
    ids = _ids()
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), rtol=1e-5, atol=1e-5)


def test_conv1d_per_channel_scales_follow_output_columns_and_broadcast_to_the_stored_weight():
    conv = Conv1D(8, 16)  # nf=8 outputs, nx=16 inputs: weight (16, 8)
    layer = QuantizedLinear(conv, LayerQuantSpec(weight=E4M3, scaling="per_channel"))
    layer(torch.randn(3, 16))
    w = conv.weight.detach().numpy()
    expected = np.abs(w).max(axis=0, keepdims=True) / np.float32(448.0)  # one scale per output column
    scale = layer.weight_scale()
    assert scale.shape == (1, 8)
    np.testing.assert_array_equal(scale.numpy(), expected.astype(np.float32))


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_quantized_hf_model_trains(build):
    model = build().train()
    quantize_model(model, FULL_PLAN)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = _ids()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses


def test_module_filter_fn_keeps_the_layers_it_rejects():
    model = tiny_gpt2()
    seen = []

    def keep_head(module: nn.Module, fqn: str) -> bool:
        seen.append((type(module), fqn))
        return fqn != "lm_head"

    quantize_model(model, FULL_PLAN, module_filter_fn=keep_head)
    assert type(model.lm_head) is nn.Linear and "lm_head" not in quantized_layers(model)
    assert len(quantized_layers(model)) == 8
    assert (nn.Linear, "lm_head") in seen and (Conv1D, "transformer.h.0.attn.c_attn") in seen


def test_unsupported_weight_bearing_modules_are_named_in_one_warning():
    class FusedLinear(nn.Linear):
        pass

    model = nn.Sequential(nn.Embedding(10, 4), nn.Conv2d(1, 2, 3), FusedLinear(4, 4), nn.Linear(4, 4))
    with pytest.warns(
        UserWarning,
        match=r"left 2 weight-bearing modules unquantized \(1 Conv2d, 1 FusedLinear\)"
        r".*also left, as expected: 1 Embedding",
    ):
        report = quantize_model(model, FULL_PLAN)
    assert set(report.layers) == {"3"}
    assert report.skipped == {"0": "Embedding", "1": "Conv2d", "2": "FusedLinear"}


def test_dequantize_gives_back_the_conv1d_with_the_same_parameters():
    model = tiny_gpt2()
    weight = model.transformer.h[0].attn.c_attn.weight
    quantize_model(model, FULL_PLAN)
    dequantize_model(model)
    restored = model.transformer.h[0].attn.c_attn
    assert type(restored) is Conv1D and restored.weight is weight and (restored.nf, restored.nx) == (96, 32)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight


def test_flips_of_a_conv1d_layer_equal_an_ml_dtypes_count_of_changed_codes():
    torch.manual_seed(3)
    layer = QuantizedLinear(Conv1D(8, 16), LayerQuantSpec(weight=E4M3, scaling="per_channel"))
    layer(torch.randn(3, 16))
    tracker = WeightFlipTracker()
    scale = layer.weight_scale()
    before = layer.weight.detach().clone()
    tracker.snapshot_pre_step("c_fc", layer.weight, E4M3, scale)
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight) * 0.002)
    flips = tracker.record_post_step("c_fc", layer.weight, E4M3, scale)

    def codes(w: torch.Tensor) -> np.ndarray:  # (in, out) weight, one scale per output column, saturating
        return np.clip(w.numpy() / scale.numpy(), -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)

    expected = int((codes(before) != codes(layer.weight.detach())).sum())
    assert 0 < expected < layer.weight.numel() and int(flips) == expected


def test_the_readme_snippet_runs_as_it_says():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = [b.split("```")[0] for b in readme.split("```python\n")[1:]]
    (snippet,) = [b for b in blocks if "GPT2LMHeadModel" in b]
    namespace: dict = {}
    exec(snippet, namespace)
    report = namespace["report"]
    assert len(report.layers) == 8 and "lm_head" not in report.layers
    assert report.skipped == {"transformer.wte": "Embedding", "transformer.wpe": "Embedding"}
