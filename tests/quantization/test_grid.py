"""grid_spacing against the decoded value table; BitStallDetector's predicted and measured stall."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from altgrad.quantization import (
    E0M7,
    E1M6,
    E2M5,
    E3M4,
    E4M3,
    E5M2,
    E6M1,
    E7M0,
    FLOAT8_E4M3FNUZ,
    BitStallDetector,
    WeightFlipTracker,
    crossing_probability,
    encode,
    grid_spacing,
)
from altgrad.quantization.grid import grid_position

EIGHT_BIT = [E0M7, E1M6, E2M5, E3M4, E4M3, E5M2, E6M1, E7M0, FLOAT8_E4M3FNUZ]


def _finite_grid(fmt) -> torch.Tensor:
    """Sorted distinct finite values of the format, from its decoded table (the independent reference)."""
    values = fmt.values()
    return torch.unique(values[torch.isfinite(values)])  # sorted, +0 and -0 merged


@pytest.mark.parametrize("fmt", EIGHT_BIT, ids=lambda f: f.name)
def test_grid_spacing_is_the_gap_to_the_next_value_up(fmt) -> None:
    grid = _finite_grid(fmt)
    nonnegative = grid[grid >= 0]
    gaps = nonnegative[1:] - nonnegative[:-1]
    spacing = grid_spacing(nonnegative[:-1].float(), fmt)
    assert torch.equal(spacing.double(), gaps)
    assert torch.equal(grid_spacing(-nonnegative[:-1].float(), fmt), spacing)  # symmetric


def test_grid_spacing_edges_and_scale() -> None:
    x = torch.tensor([0.0, -0.0, 1e-30, 1e6, math.inf, math.nan])
    spacing = grid_spacing(x, E4M3)
    assert spacing[:3].tolist() == [2.0**-9] * 3  # the subnormal spacing
    assert spacing[3:5].tolist() == [2.0**5] * 2  # the top binade's (448 = 1.75 * 2^8, M = 3)
    assert math.isnan(spacing[5])
    assert torch.equal(grid_spacing(x[:5] * 0.01, E4M3, scale=0.01), spacing[:5] * 0.01)
    assert grid_spacing(torch.tensor([0.9, -0.3, 0.0]), E0M7).tolist() == [2.0**-7] * 3  # uniform
    assert grid_spacing(torch.tensor([1.0], dtype=torch.float64), E5M2).dtype == torch.float64


def test_grid_spacing_per_channel_tensor_scale() -> None:
    w = torch.tensor([[1.0, 0.0], [4.0, 0.0]])
    scale = torch.tensor([[1.0], [4.0]])
    assert grid_spacing(w, E5M2, scale).tolist() == [[0.25, 2.0**-16], [1.0, 2.0**-14]]
    with pytest.raises(ValueError, match="scale"):
        grid_spacing(w, E5M2, scale=0.0)


@pytest.mark.parametrize("fmt", EIGHT_BIT, ids=lambda f: f.name)
def test_grid_position_counts_grid_steps(fmt) -> None:
    grid = _finite_grid(fmt).float()
    positions = grid_position(encode(grid, fmt), fmt)
    assert torch.equal(positions.diff(), torch.ones(len(grid) - 1, dtype=positions.dtype))
    if fmt.has_zero:
        assert int(positions[grid == 0]) == 0
        assert int(grid_position(encode(torch.tensor([-0.0]), fmt), fmt)) == 0


# ---- BitStallDetector -------------------------------------------------------------------------------


def test_tiny_updates_are_predicted_and_measured_stalls() -> None:
    w = torch.tensor([1.0, 1.25, -2.0, 0.5])  # on the E5M2 grid
    after = w + 0.1 * grid_spacing(w, E5M2)
    stats = BitStallDetector(E5M2).measure(w, after).to_dict()
    assert stats["elements"] == 4
    # 0.1 ulp (at w, upwards) everywhere; -2.0 moves towards zero, where the spacing is half: 0.2 ulp.
    # An update of u ulp crosses a boundary for a fraction u of uniformly placed master weights; these
    # sit on the grid, so none moves: the prediction is for off-grid (master) weights.
    assert stats["predicted_stall"] == pytest.approx(1 - (0.1 + 0.1 + 0.2 + 0.1) / 4)
    assert stats["measured_stall"] == 1.0
    assert stats["ulps_mean"] == pytest.approx(0.125) and stats["ulps_median"] == pytest.approx(0.1)
    assert stats["grid_steps_mean"] == 0.0 and stats["grid_steps_frac/0"] == 1.0


def test_grid_steps_and_histogram() -> None:
    w = torch.tensor([1.0, 1.0, 1.0, 1.0])  # E5M2 values above 1: 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4 ...
    after = torch.tensor([1.0, 1.25, 1.75, 8.0])  # 0, 1, 3 and 12 grid steps
    stats = BitStallDetector().measure(w, after, format=E5M2).to_dict()
    assert stats["predicted_stall"] == 0.25 and stats["measured_stall"] == 0.25
    assert stats["grid_steps_mean"] == (0 + 1 + 3 + 12) / 4
    assert stats["grid_steps_median"] == 1.0  # the lower median
    assert stats["ulps_mean"] == pytest.approx((0 + 1 + 3 + 28) / 4)  # |dw| / 0.25
    assert [stats[f"grid_steps_frac/{b}"] for b in ("0", "1", "2-3", "4-7", "8-15", "16+")] == [
        0.25, 0.25, 0.25, 0.0, 0.25, 0.0,
    ]  # fmt: skip


def test_updated_mask_selects_elements_and_empty_is_nan() -> None:
    w = torch.tensor([1.0, 1.0, 1.0])
    after = torch.tensor([2.0, 1.0, 1.0])
    detector = BitStallDetector(E5M2)
    stats = detector.measure(w, after, updated=torch.tensor([True, True, False])).to_dict()
    assert stats["elements"] == 2 and stats["measured_stall"] == 0.5
    empty = detector.measure(w, after, updated=torch.zeros(3, dtype=torch.bool)).to_dict()
    assert (
        empty["elements"] == 0 and math.isnan(empty["predicted_stall"]) and math.isnan(empty["ulps_median"])
    )


def test_crossing_probability_by_hand_and_at_a_binade_edge() -> None:
    # E5M2 spacing: 0.25 in [1, 2), 0.125 in [0.5, 1), 1.0 in [4, 8)
    w = torch.tensor([1.5, 1.0, 1.0, -1.0, -1.0, 4.0, 1.5])
    dw = torch.tensor([0.1, 0.1, -0.1, 0.1, -0.1, -0.2, 0.6])
    p = crossing_probability(w, dw, E5M2)
    assert p.tolist() == pytest.approx([0.4, 0.4, 0.8, 0.8, 0.4, 0.4, 1.0])
    # at scale 2 the grid is the scaled one: w / 2 = 0.5 sees 0.0625 * 2 below and 0.125 * 2 above
    p = crossing_probability(torch.tensor([1.0, 1.0]), torch.tensor([-0.0625, 0.0625]), E5M2, 2.0)
    assert p.tolist() == [0.5, 0.25]
    with pytest.raises(ValueError, match="shape"):
        crossing_probability(torch.ones(2), torch.ones(3), E5M2)


@pytest.mark.parametrize("fmt", EIGHT_BIT, ids=lambda f: f.name)
def test_crossing_probability_uses_the_spacing_in_the_direction_of_motion(fmt) -> None:
    """Against grid_spacing (checked against the decoded value table) one float32 step towards w + dw."""
    grid = _finite_grid(fmt)
    w = torch.cat([grid, grid * 1.3, grid / 3, torch.tensor([0.0, -0.0])]).float()
    w = w[torch.isfinite(w)].repeat(2)
    half = len(w) // 2
    dw = torch.cat([torch.full((half,), 1e-3), torch.full((half,), -1e-3)]) * w.abs().clamp(min=1)
    reference = (dw.abs() / grid_spacing(torch.nextafter(w, w + dw), fmt)).clamp(max=1.0)
    torch.testing.assert_close(crossing_probability(w, dw, fmt), reference, rtol=1e-6, atol=0)


def test_predicted_stall_matches_a_monte_carlo_count() -> None:
    """Off-grid weights uniform in [1.25, 1.75) (one E4M3 binade, spacing 0.125), updates of up to 1.5
    ulp: the fraction whose rounded value (ml_dtypes float8_e4m3fn) is unchanged is 1 - mean P(cross)."""
    rng = np.random.default_rng(0)
    n = 400_000
    w = rng.uniform(1.25, 1.75, n).astype(np.float32)
    dw = (rng.uniform(-0.1875, 0.1875, n)).astype(np.float32)
    after = w + dw
    unchanged = w.astype(ml_dtypes.float8_e4m3fn) == after.astype(ml_dtypes.float8_e4m3fn)
    measured = float(unchanged.mean())
    expected = 1.0 - float(np.minimum(1.0, np.abs(dw) / 0.125).mean())  # the formula, by hand in numpy
    assert measured == pytest.approx(expected, abs=0.003)  # Monte-Carlo error about 0.0008
    stats = BitStallDetector(E4M3).measure(torch.from_numpy(w), torch.from_numpy(after)).to_dict()
    assert stats["predicted_stall"] == pytest.approx(expected, abs=1e-6)
    assert stats["measured_stall"] == pytest.approx(measured, abs=1e-9)


def test_measured_stall_matches_the_tracker() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    grad = torch.randn_like(w).masked_fill_(torch.rand_like(w) < 0.2, 0.0)
    after = w - 0.05 * grad - 0.01 * w  # an update plus decay
    tracker = WeightFlipTracker()
    tracker.snapshot_pre_step("fc", w, E4M3, 0.5, grad=grad)
    tracker.record_post_step("fc", after, E4M3, 0.5)
    stats = BitStallDetector(E4M3, scale=0.5).measure(w, after, updated=grad.abs() > 1e-10).to_dict()
    assert stats["measured_stall"] == pytest.approx(tracker.get_stall_ratios()["fc"])
    assert 0.0 < stats["predicted_stall"] < 1.0


def test_detector_errors() -> None:
    with pytest.raises(ValueError, match="needs a format"):
        BitStallDetector().measure(torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="shape"):
        BitStallDetector(E5M2).measure(torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="histogram_edges"):
        BitStallDetector(E5M2, histogram_edges=(1, 2))
    with pytest.raises(ValueError, match="scale"):
        BitStallDetector(E5M2, scale=-1.0)


@pytest.mark.parametrize(
    "bad",
    [0.0, -1.0, math.nan, math.inf, True, "1", torch.tensor([0.5, 0.0]), torch.tensor(math.inf),
     torch.tensor([1, 2])],
)  # fmt: skip
def test_every_scale_is_checked_by_one_rule(bad) -> None:
    """quantize, encode, decode, the grid, the stall detector and GridOptim reject the same scales."""
    from altgrad.quantization import decode, quantize
    from altgrad.training.optimizer import GridOptim

    x = torch.ones(2)
    calls = [
        lambda: quantize(x, "E4M3", bad),
        lambda: encode(x, "E4M3", bad),
        lambda: decode(torch.zeros(2, dtype=torch.uint8), "E4M3", bad),
        lambda: grid_spacing(x, "E4M3", bad),
        lambda: crossing_probability(x, x, "E4M3", bad),
        lambda: BitStallDetector("E4M3", bad),
        lambda: GridOptim([{"params": [torch.nn.Parameter(x)], "format": "E4M3", "scale": bad}]),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"^scale: "):
            call()
