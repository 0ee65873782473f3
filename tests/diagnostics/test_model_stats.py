"""Gradient statistics and rank statistics of a model, one host read for the whole model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from altgrad.diagnostics.model_stats import compute_gradient_stats, compute_rank_stats
from altgrad.quantization import compute_effective_rank, compute_stable_rank


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2, bias=False))
    model[0].weight.grad = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1e-9, 0.0, 0.0, -1.0]])
    model[0].bias.grad = torch.tensor([0.0, 2.0, 0.0])
    model[1].weight.grad = torch.full((2, 3), -0.5)
    return model


def test_gradient_stats_per_parameter_and_aggregates(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()

    def no_item(self):  # one stacked read, no per-parameter .item()
        raise AssertionError("per-parameter .item() call")

    monkeypatch.setattr(torch.Tensor, "item", no_item)
    stats = compute_gradient_stats(model)
    monkeypatch.undo()
    assert stats["grad_norm_l2/0.weight"] == pytest.approx((25 + 1 + 1e-18) ** 0.5)
    assert stats["grad_norm_linf/0.weight"] == 4.0
    assert stats["dead_neuron_frac/0.weight"] == pytest.approx(1 / 3)  # row 1 is all zero
    assert stats["dead_neuron_frac/0.bias"] == pytest.approx(2 / 3)  # each bias element is a row
    assert stats["grad_norm_l2/1.weight"] == pytest.approx(0.5 * 6**0.5)
    assert stats["dead_neuron_frac/1.weight"] == 0.0
    l2 = [stats[f"grad_norm_l2/{n}"] for n in ("0.weight", "0.bias", "1.weight")]
    assert stats["grad_norm_l2/mean"] == pytest.approx(sum(l2) / 3)
    assert stats["grad_norm_l2/min"] == pytest.approx(min(l2))
    assert stats["grad_norm_linf/max"] == 4.0
    assert stats["dead_neuron_frac/mean"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)


def test_gradient_stats_skip_missing_grads_and_low_precision() -> None:
    model = _model()
    model[0].bias.grad = None
    model[1].bfloat16()  # a low-precision parameter and gradient
    model[1].weight.grad = torch.full((2, 3), -0.5, dtype=torch.bfloat16)
    stats = compute_gradient_stats(model)
    assert "grad_norm_l2/0.bias" not in stats
    assert stats["grad_norm_l2/1.weight"] == pytest.approx(0.5 * 6**0.5, rel=1e-3)
    assert compute_gradient_stats(nn.Linear(2, 2)) == {}


def test_rank_stats() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.LayerNorm(8))
    stats = compute_rank_stats(model)
    names = ("0.weight", "2.weight")
    assert {k.split("/", 1)[1] for k in stats} == set(names) | {"mean", "min"}  # no biases or norm gains
    for name in names:
        w = model.get_parameter(name)
        assert stats[f"stable_rank/{name}"] == pytest.approx(compute_stable_rank(w), rel=1e-9)
        assert stats[f"effective_rank/{name}"] == pytest.approx(compute_effective_rank(w), rel=1e-9)
        assert f"spectral_norm/{name}" in stats
    stable = [stats[f"stable_rank/{n}"] for n in names]
    assert stats["stable_rank/mean"] == pytest.approx(sum(stable) / 2)
    assert stats["stable_rank/min"] == min(stable)
    assert stats["effective_rank/min"] == min(stats[f"effective_rank/{n}"] for n in names)
    assert compute_rank_stats(nn.LayerNorm(4)) == {}
