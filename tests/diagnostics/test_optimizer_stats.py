"""Stiffness, grid alignment, gradient-stiffness correlation and bit positions, with one host sync."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from altgrad.diagnostics.optimizer_stats import optimizer_statistics
from altgrad.quantization import E0M7, E4M3
from altgrad.training.optimizer import GridOptim, ManifoldAdamW


def test_hand_computed_statistics():
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0625, 3.0]))  # 1.0625: halfway between 1 and 1.125
    w.grad = torch.tensor([0.1, 0.2, 0.3])
    stats = optimizer_statistics(None, lambda p: (E4M3, 1.0), {"fc": w})
    assert set(stats) == {
        "stiffness_mean/fc",
        "stiffness_max/fc",
        "grid_alignment/fc",
        "grad_stiffness_corr/fc",
    }
    assert stats["stiffness_mean/fc"] == pytest.approx((1 / 8 + 1 / 8 + 1 / 4) / 3)
    assert stats["stiffness_max/fc"] == 0.25
    assert stats["grid_alignment/fc"] == pytest.approx(0.5 / 3)  # only 1.0625 is off-grid, by 0.5 ULP
    expected = np.corrcoef([0.1, 0.2, 0.3], [1 / 8, 1 / 8, 1 / 4])[0, 1]
    assert stats["grad_stiffness_corr/fc"] == pytest.approx(expected, rel=1e-6)


def test_uniform_grid_correlation_is_nan_and_missing_grad_has_no_key():
    w = torch.nn.Parameter(torch.tensor([0.1, 0.5]))
    w.grad = torch.tensor([1.0, 2.0])
    stats = optimizer_statistics(None, lambda p: (E0M7, 2.0), [("a", w)])
    assert stats["stiffness_mean/a"] == stats["stiffness_max/a"] == 2 / 128
    assert math.isnan(stats["grad_stiffness_corr/a"])  # S is constant: undefined, reported as NaN
    w.grad = None
    assert "grad_stiffness_corr/a" not in optimizer_statistics(None, lambda p: (E0M7, 2.0), [("a", w)])


def test_bit_positions_and_group_formats_come_from_the_optimizer():
    w = torch.nn.Parameter(torch.tensor([1.25, -2.5, 1.25, -2.5]))
    plain = torch.nn.Parameter(torch.ones(2))
    opt = ManifoldAdamW([{"params": [w], "format": "E4M3"}, {"params": [plain]}], lr=0.25, weight_decay=0.0,
                        track_bit_position=True)  # fmt: skip
    for _ in range(2):
        w.grad, plain.grad = torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.ones(2)
        opt.step()
    stats = optimizer_statistics(opt, None, {"w": w, "plain": plain})
    assert not any(key.endswith("/plain") for key in stats)  # not quantized: skipped
    assert stats["bit_position_mean/w"] == pytest.approx(0.0, abs=1e-6)
    assert stats["bit_position_std/w"] == pytest.approx(0.5, rel=1e-5)  # +-0.5 ULP each
    assert stats["grid_alignment/w"] == pytest.approx(0.5, rel=1e-5)  # half-way between grid values


def test_grid_optimizer_weights_are_aligned():
    w = torch.nn.Parameter(torch.randn(32, generator=torch.Generator().manual_seed(0)))
    opt = GridOptim([w], lr=0.5, seed=0, quant_info=lambda p: (E4M3, 0.01))
    w.grad = torch.randn(32, generator=torch.Generator().manual_seed(1))
    opt.step()
    assert optimizer_statistics(opt, None, {"w": w})["grid_alignment/w"] == 0.0


def test_one_host_read_for_all_layers(monkeypatch):
    reads = {"tolist": 0, "item": 0}
    for method in reads:
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            reads[_method] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    layers = {f"l{i}": torch.nn.Parameter(torch.randn(4, 4)) for i in range(5)}
    for p in layers.values():
        p.grad = torch.randn(4, 4)
    stats = optimizer_statistics(None, lambda p: (E4M3, 0.5), layers)
    assert len(stats) == 20 and reads == {"tolist": 1, "item": 0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_statistics_sync_once():
    w = torch.nn.Parameter(torch.randn(64, 64, device="cuda"))
    opt = ManifoldAdamW([w], lr=0.5, track_bit_position=True,
                        quant_info=lambda p: (E4M3, torch.tensor(0.01, device="cuda")))  # fmt: skip
    w.grad = torch.randn(64, 64, device="cuda")
    opt.step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            stats = optimizer_statistics(opt, None, {"w": w})
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [c for c in caught if "synchroniz" in str(c.message)]
    assert len(syncs) == 1, [str(c.message) for c in syncs]
    assert len(stats) == 6
