"""The original AltGrad's integration calls: ``QuantizedLinear(linear, fmt)`` and
``quantize_model(model, fmt, skip_patterns=...)`` with a bare format (weights only, delayed scaling)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch
import torch.nn as nn

from altgrad.integration import QuantizedLinear, quantize_model
from altgrad.quantization import FORMAT_REGISTRY

E4M3 = FORMAT_REGISTRY["E4M3"]


def test_quantized_linear_with_a_bare_format_quantizes_the_weight_only() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    layer = QuantizedLinear(linear, E4M3)
    assert layer.spec.weight is E4M3 and layer.spec.activation is None and layer.spec.grad is None
    assert layer.weight is linear.weight and layer.bias is linear.bias  # the same Parameters
    x = torch.randn(4, 16)
    w = linear.weight.detach().numpy()
    scale = np.float32(np.abs(w).max()) / np.float32(448)  # first call: this weight's amax -> 448
    w_q = (w / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
    expected = x.numpy() @ w_q.T + linear.bias.detach().numpy()
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-6, atol=1e-6)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.lm_head = nn.Linear(8, 4)


def test_quantize_model_with_a_bare_format_and_skip_patterns() -> None:
    model = _Net()
    report = quantize_model(model, E4M3, skip_patterns=[r"lm_head", r"^encoder\.2$"])
    assert isinstance(model.encoder[0], QuantizedLinear) and model.encoder[0].spec.weight is E4M3
    assert model.encoder[0].spec.activation is None
    assert type(model.encoder[2]) is nn.Linear and type(model.lm_head) is nn.Linear  # skipped by regex
    assert list(report.layers) == ["encoder.0"]
    quantize_model(everything := _Net(), E4M3)
    assert all(isinstance(m, QuantizedLinear) for m in (everything.encoder[0], everything.encoder[2]))
    assert isinstance(everything.lm_head, QuantizedLinear)
