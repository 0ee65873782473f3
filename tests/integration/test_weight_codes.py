"""QuantizedLinear hands the codes of its forward's weight to a flip tracker: the same values, once."""

from __future__ import annotations

import torch
import torch.nn as nn

from altgrad.integration import LayerQuantSpec, QuantizedLinear
from altgrad.quantization import E3M4, E4M3, encode


def _layer(rounding: str = "nearest", weight=E4M3, scaling: str = "delayed") -> QuantizedLinear:
    torch.manual_seed(0)
    spec = LayerQuantSpec(weight=weight, activation=E4M3, scaling=scaling, rounding=rounding)
    return QuantizedLinear(nn.Linear(24, 16), spec)


def test_keeping_codes_leaves_the_forward_bit_for_bit_and_hands_the_codes_once() -> None:
    for scaling in ("delayed", "per_channel", "mx"):
        plain, keeping = _layer(scaling=scaling), _layer(scaling=scaling)
        keeping.keep_weight_codes = True
        x = torch.randn(5, 24)
        for _ in range(3):  # delayed scaling: the scale moves between steps
            out, kept = plain(x), keeping(x)
            assert torch.equal(out, kept), scaling
            out.sum().backward()
            kept.sum().backward()
            assert torch.equal(plain.weight.grad, keeping.weight.grad)
            codes = keeping.take_weight_codes()
            assert torch.equal(codes, encode(keeping.weight, E4M3, keeping.weight_scale())), scaling
            assert keeping.take_weight_codes() is None  # handed over once
        assert plain.take_weight_codes() is None  # not asked to keep them


def test_no_codes_after_a_write_a_format_switch_or_for_other_roundings() -> None:
    layer = _layer()
    layer.keep_weight_codes = True
    layer(torch.randn(2, 24))
    with torch.no_grad():
        layer.weight.mul_(2.0)  # the weight moved since the forward
    assert layer.take_weight_codes() is None
    layer(torch.randn(2, 24))
    layer.set_format("weight", E3M4)
    assert layer.take_weight_codes() is None
    stochastic = _layer(rounding="stochastic")
    stochastic.keep_weight_codes = True
    stochastic(torch.randn(2, 24))
    assert stochastic.take_weight_codes() is None  # its codes are not the nearest ones a tracker counts
    no_native = _layer(weight=E3M4)
    no_native.keep_weight_codes = True
    no_native(torch.randn(2, 24))
    assert no_native.take_weight_codes() is None
