"""Quant recipes and the scale options they use: amax_compute_algo, power-of-two and RCEIL scales.

References: hand computations, numpy, and torchao's own float8 / MX casts where torchao is installed.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from altgrad.integration import LayerQuantSpec, QuantizedLinear, QuantPlan, quantize_model
from altgrad.integration.recipes import QUANT_RECIPES, expand_recipe
from altgrad.quantization import E4M3, E5M2, AmaxHistory, encode
from altgrad.training.config import ConfigError, load_config


def test_a_recipe_fills_in_only_the_keys_the_user_did_not_give():
    config = load_config(None, ["quant.recipe=te_hybrid_delayed", "quant.amax_history=8"])
    assert (config.quant.weight, config.quant.activation, config.quant.grad) == ("E4M3", "E4M3", "E5M2")
    assert config.quant.scaling == "delayed" and config.quant.amax_compute_algo == "max"
    assert config.quant.amax_history == 8  # explicit wins over the recipe's 1024
    rowwise = load_config(None, ["quant.recipe=torchao_rowwise"]).quant
    assert (rowwise.grad, rowwise.scaling, rowwise.power_of_two_scales) == ("E4M3", "rowwise", True)
    mx = load_config(None, ["quant.recipe=mxfp8", "quant.grad=E5M2"]).quant
    assert (mx.scaling, mx.mx_scale_rounding, mx.grad) == ("mx", "ceil", "E5M2")
    with pytest.raises(ConfigError, match="unknown recipe 'te'; allowed: te_hybrid_delayed"):
        load_config(None, ["quant.recipe=te"])


@pytest.mark.parametrize("name", list(QUANT_RECIPES))
def test_every_recipe_is_a_valid_plan(name):
    plan = QuantPlan(**QUANT_RECIPES[name])
    layer = QuantizedLinear(nn.Linear(64, 32), plan.spec_for("x")[0])
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert expand_recipe({"recipe": name})["weight"] == "E4M3"


def test_most_recent_amax_uses_only_the_latest_step():
    history = AmaxHistory(4)
    for amax in (4.0, 1.0, 2.0):
        history.update(torch.tensor(amax))
    assert float(history.amax_by("max")) == 4.0 and float(history.amax_by("most_recent")) == 2.0
    with pytest.raises(ValueError, match="amax_compute_algo"):
        history.amax_by("mean")

    layer = QuantizedLinear(nn.Linear(8, 4), LayerQuantSpec(activation=E4M3, amax_compute_algo="most_recent"))
    for amax in (4.0, 2.0):
        layer(torch.full((1, 8), amax))
    layer(torch.ones(1, 8))
    assert float(layer.quantizers["activation"].last_scale) == np.float32(2.0) / np.float32(448.0)


def test_power_of_two_scales_round_up_per_row():
    x = torch.tensor([[1.0, -3.0], [448.0, 0.5], [0.0, 0.0]])
    layer = QuantizedLinear(
        nn.Linear(2, 2), LayerQuantSpec(activation=E4M3, scaling="rowwise", power_of_two_scales=True)
    )
    layer(x)
    # by hand: 3/448 -> 2^-7 (3/448 = 0.0067 > 2^-8), 448/448 = 1 exactly, an all-zero row -> 1
    assert layer.quantizers["activation"].last_scale.flatten().tolist() == [2.0**-7, 1.0, 1.0]


def test_rowwise_scales_follow_each_row_of_every_tensor():
    torch.manual_seed(0)
    layer = QuantizedLinear(nn.Linear(16, 8), LayerQuantSpec(weight=E4M3, activation=E4M3, scaling="rowwise"))
    x = torch.randn(5, 16)
    layer(x)
    expected_x = np.abs(x.numpy()).max(axis=1, keepdims=True) / np.float32(448.0)
    np.testing.assert_array_equal(layer.quantizers["activation"].last_scale.numpy(), expected_x)
    w = layer.weight.detach().numpy()
    np.testing.assert_array_equal(
        layer.weight_scale().numpy(), np.abs(w).max(axis=1, keepdims=True) / np.float32(448)
    )


# ---- against torchao --------------------------------------------------------------------------------------


def _torchao_float8_codes(x: torch.Tensor, dtype: torch.dtype, rowwise: bool) -> torch.Tensor:
    float8 = pytest.importorskip("torchao.float8")
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic

    options = {"scaling_granularity": ScalingGranularity.AXISWISE, "axiswise_dim": -1} if rowwise else {}
    cast = hp_tensor_to_float8_dynamic(
        x,
        dtype,
        float8.float8_training_tensor.LinearMMConfig(),
        round_scales_to_power_of_2=rowwise,
        **options,
    )
    return cast._data.view(torch.uint8)


@pytest.mark.parametrize("recipe", ["torchao_tensorwise", "torchao_rowwise"])
def test_torchao_recipes_give_torchao_float8_codes(recipe):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64))
    quantize_model(model, QuantPlan(**QUANT_RECIPES[recipe]))
    layer = model[0]
    x = torch.randn(32, 256) * torch.logspace(-3, 3, 32)[:, None]  # rows of very different ranges
    x.requires_grad_(True)
    upstream = torch.randn(32, 64)
    grads = {}
    layer.quantizers["grad"].register_forward_hook(lambda m, args, out: grads.setdefault("g", args[0]))
    layer(x).backward(upstream)
    rowwise = recipe == "torchao_rowwise"
    tensors = {"activation": x.detach(), "weight": layer.weight.detach(), "grad": grads["g"]}
    for kind, tensor in tensors.items():
        fmt = layer.spec.format_of(kind)
        ours = encode(tensor, fmt, layer.quantizers[kind].last_scale)
        theirs = _torchao_float8_codes(
            tensor, {E4M3: torch.float8_e4m3fn, E5M2: torch.float8_e5m2}[fmt], rowwise
        )
        assert torch.equal(ours, theirs), (kind, int((ours != theirs).sum()))


def test_mxfp8_rceil_scales_and_codes_equal_torchao():
    pytest.importorskip("torchao.prototype.mx_formats")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    torch.manual_seed(0)
    x = torch.randn(16, 256) * torch.logspace(-4, 4, 16)[:, None]
    layer = QuantizedLinear(nn.Linear(256, 8), QuantPlan(**QUANT_RECIPES["mxfp8"]).spec_for("x")[0])
    ours = layer.quantizers["activation"].scale_for(x)[:, ::32]
    scale_e8m0, data = to_mx(x, torch.float8_e4m3fn, 32, ScaleCalculationMode.RCEIL)
    theirs = scale_e8m0.view(torch.uint8).to(torch.float64).sub(127).exp2().reshape(16, 8)
    assert torch.equal(ours.double(), theirs)
    codes = encode(x, E4M3, layer.quantizers["activation"].scale_for(x))
    assert torch.equal(codes, data.view(torch.uint8))
    assert math.isfinite(float(ours.max()))


@pytest.mark.parametrize("recipe", list(QUANT_RECIPES))
def test_a_run_with_each_recipe_completes_with_flips(recipe, tmp_path):
    from altgrad.training.trainer import train

    overrides = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
                 "train.batch_size=4", "train.max_steps=3", "train.eval_interval=3", "train.eval_batches=1",
                 "logging.progress=false", f"out_dir={tmp_path}", f"quant.recipe={recipe}"]  # fmt: skip
    summary = train(load_config(None, overrides))
    assert summary["status"] == "completed"
    assert summary["quant"]["scaling"] == QUANT_RECIPES[recipe]["scaling"]
    assert summary["total_flips"] > 0
