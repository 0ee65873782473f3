"""Flip, update, stall and drift counting of WeightFlipTracker, checked against independent counts."""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

import altgrad.diagnostics.flips as flip_metrics
from altgrad.quantization import (
    E4M3,
    E5M2,
    FLOAT16,
    WeightFlipTracker,
    attach_flip_tracker,
    compute_flip_rate,
    compute_stall_ratio,
    quantize,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---- compute_flip_rate / compute_stall_ratio ----------------------------------------------------------


def test_flip_rate_counts_changed_elements() -> None:
    assert compute_flip_rate(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 2.5, 3.0, 0.0])) == 0.5
    assert compute_flip_rate(torch.ones(3, 4), torch.ones(3, 4)) == 0.0


def test_flip_rate_on_integer_codes() -> None:
    prev = torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8)
    assert compute_flip_rate(prev, torch.tensor([1, 2, 3, 4, 6], dtype=torch.uint8)) == pytest.approx(0.2)


def test_flip_rate_nan_in_both_is_unchanged_and_signed_zeros_are_equal() -> None:
    prev = torch.tensor([math.nan, 0.0, 1.0, math.nan])
    curr = torch.tensor([math.nan, -0.0, 1.0, 2.0])
    assert compute_flip_rate(prev, curr) == 0.25


def test_flip_rate_empty_and_shape_mismatch() -> None:
    assert compute_flip_rate(torch.empty(0), torch.empty(0)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        compute_flip_rate(torch.ones(3), torch.ones(4))


def test_stall_ratio() -> None:
    assert compute_stall_ratio(25, 100) == 0.75
    assert compute_stall_ratio(0, 0) == 0.0  # never NaN
    assert compute_stall_ratio(5, 0) == 0.0
    assert compute_stall_ratio(0, 10) == 1.0
    assert compute_stall_ratio(20, 10) == 0.0  # clamped


# ---- the tracker, element by element ------------------------------------------------------------------


def _step(
    tracker: WeightFlipTracker, name: str, w: torch.Tensor, new: torch.Tensor, grad=None, fmt=E5M2
) -> int:
    """Snapshot, change ``w`` in place (as an optimizer would), count the flips."""
    tracker.snapshot_pre_step(name, w, fmt, 1.0, grad=grad)
    with torch.no_grad():
        w.copy_(new)
    return tracker.compute_flips_post_step(name, w, fmt, 1.0)


def test_flips_are_codes_that_changed() -> None:
    tracker = WeightFlipTracker()
    w = torch.tensor([1.0, 1.0, 1.0, 1.0])
    # E5M2 around 1.0: spacing 0.25, so 1.1 rounds back to 1.0, 1.2 to 1.25, 2.0 is two binades up.
    flips = _step(tracker, "fc", w, torch.tensor([1.1, 1.2, 2.0, 1.0]))
    assert flips == 2
    assert tracker.get_flip_counts() == {"fc": 2}
    assert tracker.get_flip_rates() == {"fc": 0.5}


def test_signed_zero_change_is_not_a_flip() -> None:
    tracker = WeightFlipTracker()
    w = torch.tensor([1e-30, -1e-30])
    assert _step(tracker, "fc", w, torch.tensor([-1e-30, 1e-30])) == 0


@pytest.mark.parametrize(
    "name", ["E4M3", "E5M2", "float8_e4m3fnuz", "E3M4", "float6_e2m3fn", "float8_e8m0fnu"]
)
def test_every_pair_of_values_counts_by_value_and_grid_steps(name: str) -> None:
    """All 256 x 256 (before, after) value pairs of a format: a flip where the values differ (-0 == +0,
    NaN == NaN; NaN != 0 in fnuz), grid steps |position after - position before| with positions
    +-(code & magnitude bits) of the codes numpy reads off the values (NaN at the format's NaN code)."""
    fmt = flip_metrics.get_format(name)
    values = fmt.values().float().numpy()
    before, after = np.repeat(values, len(values)), np.tile(values, len(values))
    tracker = WeightFlipTracker()
    tracker.snapshot_pre_step("all", torch.from_numpy(before), fmt, 1.0)
    tracker.record_post_step("all", torch.from_numpy(after), fmt, 1.0)
    counts = tracker.pop_step_counts()["all"]
    with np.errstate(invalid="ignore"):  # the tracker encodes saturating: +-inf is +-max_finite
        before, after = (np.clip(v, -fmt.max_finite, fmt.max_finite) for v in (before, after))
        same = (before == after) | (np.isnan(before) & np.isnan(after))
    assert counts["flips"] == int((~same).sum())

    magnitude_bits = fmt.exponent_bits + fmt.mantissa_bits
    canonical = {float(v): code for code, v in reversed(list(enumerate(values))) if not np.isnan(v)}

    def position(v: float) -> int:
        code = fmt.encode(math.nan) if np.isnan(v) else canonical[float(v)] if v != 0 else 0
        sign = -1 if fmt.signed and code >> magnitude_bits else 1
        return sign * (code & ((1 << magnitude_bits) - 1))

    line = np.array([position(v) for v in np.clip(values, -fmt.max_finite, fmt.max_finite)])
    assert counts["grid_steps"] == int(np.abs(np.tile(line, len(line)) - np.repeat(line, len(line))).sum())


def test_update_counts_start_at_first_step_with_grad() -> None:
    tracker = WeightFlipTracker()
    w = torch.ones(4)
    tracker.snapshot_pre_step("fc", w, E5M2, 1.0)
    tracker.compute_flips_post_step("fc", w, E5M2, 1.0)
    assert tracker.update_counts == {}
    tracker.snapshot_pre_step("fc", w, E5M2, 1.0, grad=torch.zeros(4))
    tracker.compute_flips_post_step("fc", w, E5M2, 1.0)
    assert tracker.update_counts == {"fc": 0}
    assert tracker.get_update_counts() == {"fc": 0}
    tracker.snapshot_pre_step("fc", w, E5M2, 1.0, grad=torch.tensor([1.0, 1e-11, -1e-3, 0.0]))
    tracker.compute_flips_post_step("fc", w, E5M2, 1.0)
    assert tracker.update_counts == {"fc": 2}  # counted at the post-step call, cumulative


def test_a_grad_at_the_post_step_call_decides_the_updates() -> None:
    tracker = WeightFlipTracker()
    w = torch.ones(4)
    tracker.snapshot_pre_step("fc", w, E5M2, 1.0, grad=torch.ones(4))
    with torch.no_grad():
        w.copy_(torch.tensor([2.0, 2.0, 1.0, 1.0]))
    tracker.record_post_step("fc", w, E5M2, 1.0, grad=torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert tracker.update_counts == {"fc": 2}
    assert tracker.get_drift_flip_counts() == {"fc": 1} and tracker.get_stall_ratios() == {"fc": 0.5}


def test_stall_ratio_counts_flips_among_updated_and_drift_apart() -> None:
    tracker = WeightFlipTracker()
    w = torch.ones(6)
    grad = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])  # 4 updates; the last two drift (weight decay)
    new = torch.tensor([1.5, 1.1, 1.1, 1.1, 0.5, 1.0])  # 1 updated flip, 1 drift flip
    assert _step(tracker, "fc", w, new, grad=grad) == 2
    assert tracker.get_update_counts() == {"fc": 4}
    assert tracker.get_drift_flip_counts() == {"fc": 1}
    assert tracker.get_stall_ratios() == {"fc": 0.75}


def test_stall_ratio_is_zero_not_nan_without_updates() -> None:
    tracker = WeightFlipTracker()
    w = torch.ones(3)
    _step(tracker, "fc", w, torch.full((3,), 2.0), grad=torch.zeros(3))
    _step(tracker, "no_grad", torch.ones(3), torch.full((3,), 2.0))
    assert tracker.get_stall_ratios() == {"fc": 0.0, "no_grad": 0.0}
    assert tracker.get_drift_flip_counts() == {"fc": 3, "no_grad": 0}  # without a grad flips are not split
    assert tracker.get_flip_counts() == {"fc": 3, "no_grad": 3}


def test_flip_rates_are_per_element_and_step() -> None:
    tracker = WeightFlipTracker()
    w = torch.ones(4)
    _step(tracker, "fc", w, torch.tensor([2.0, 2.0, 1.0, 1.0]))
    _step(tracker, "fc", w, torch.tensor([2.0, 2.0, 1.0, 1.0]))  # nothing changes
    assert tracker.get_flip_rates() == {"fc": 2 / 8}


def test_unchanged_weight_gives_zero_flips() -> None:
    tracker = WeightFlipTracker()
    w = torch.randn(8)
    tracker.snapshot_pre_step("fc", w, E5M2, 1.0)
    assert tracker.compute_flips_post_step("fc", w, E5M2, 1.0) == 0


def test_record_post_step_returns_a_tensor() -> None:
    tracker = WeightFlipTracker()
    w = torch.ones(4)
    tracker.snapshot_pre_step("fc", w, E5M2, 1.0)
    with torch.no_grad():
        w[0] = 4.0
    flips = tracker.record_post_step("fc", w, E5M2, 1.0)
    assert isinstance(flips, torch.Tensor) and flips.dtype == torch.int64 and int(flips) == 1


# ---- errors -------------------------------------------------------------------------------------------


def test_post_step_without_snapshot_names_the_layer() -> None:
    tracker = WeightFlipTracker()
    with pytest.raises(ValueError, match="'h.0.mlp'"):
        tracker.compute_flips_post_step("h.0.mlp", torch.ones(3), E5M2, 1.0)
    w = torch.ones(3)
    tracker.snapshot_pre_step("h.0.mlp", w, E5M2, 1.0)
    tracker.compute_flips_post_step("h.0.mlp", w, E5M2, 1.0)
    with pytest.raises(KeyError, match="no snapshot_pre_step"):  # one post-step per snapshot
        tracker.compute_flips_post_step("h.0.mlp", w, E5M2, 1.0)  # (the error is also a KeyError)


def test_shape_change_names_the_layer() -> None:
    tracker = WeightFlipTracker()
    tracker.snapshot_pre_step("fc", torch.ones(3), E5M2, 1.0)
    with pytest.raises(ValueError, match=r"'fc'.*shape changed"):
        tracker.compute_flips_post_step("fc", torch.ones(4), E5M2, 1.0)


def test_format_change_and_grad_shape_are_rejected() -> None:
    tracker = WeightFlipTracker()
    w = torch.ones(3)
    tracker.snapshot_pre_step("fc", w, E5M2, 1.0)
    with pytest.raises(ValueError, match="E4M3"):
        tracker.compute_flips_post_step("fc", w, E4M3, 1.0)
    with pytest.raises(ValueError, match="grad shape"):
        tracker.snapshot_pre_step("fc", w, E5M2, 1.0, grad=torch.ones(4))
    with pytest.raises(ValueError, match="unknown format"):
        tracker.snapshot_pre_step("fc", w, "E9M9X", 1.0)


# ---- encoding every step, state size --------------------------------------------------------------------


def _count_encodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = flip_metrics.native_encode

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(flip_metrics, "native_encode", counting)
    return calls


def test_both_codes_are_encoded_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_encodes(monkeypatch)
    tracker = WeightFlipTracker()
    w = nn.Parameter(torch.randn(16, 8))
    optimizer = torch.optim.SGD([w], lr=0.1)
    for _ in range(4):
        w.grad = torch.randn_like(w)
        tracker.snapshot_pre_step("fc", w, E5M2, 1.0, grad=w.grad)
        optimizer.step()
        tracker.record_post_step("fc", w, E5M2, 1.0)
    assert len(calls) == 2 * 4  # nothing is inferred from earlier steps


def test_a_write_that_keeps_the_version_counter_is_seen() -> None:
    tracker = WeightFlipTracker()
    w = nn.Parameter(torch.ones(4))
    for new in (torch.tensor([2.0, 1.0, 1.0, 1.0]), torch.tensor([2.0, 4.0, 1.0, 1.0])):
        version = w._version
        tracker.snapshot_pre_step("fc", w, E5M2, 1.0)
        w.data.copy_(new)  # through .data: the version counter does not move (as in fused kernels)
        assert w._version == version
        tracker.record_post_step("fc", w, E5M2, 1.0)
    assert tracker.get_flip_counts() == {"fc": 2}


def test_inference_tensors_are_tracked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_encodes(monkeypatch)
    tracker = WeightFlipTracker()
    with torch.inference_mode():
        w = torch.ones(4)  # no version counter
        tracker.snapshot_pre_step("fc", w, E5M2, 1.0)
        w[0] = 2.0
        assert tracker.compute_flips_post_step("fc", w, E5M2, 1.0) == 1
    assert len(calls) == 2


def test_state_is_held_only_during_a_step_one_byte_per_element() -> None:
    tracker = WeightFlipTracker()
    w = torch.randn(32, 16)
    tracker.snapshot_pre_step("fc", w, E4M3, 1.0, grad=torch.randn_like(w))
    assert tracker.state_bytes() == 2 * w.numel()  # codes + the updated-mask, until the post-step
    assert tracker._layers["fc"].snapshot.codes.dtype == torch.uint8
    tracker.record_post_step("fc", w, E4M3, 1.0)
    assert tracker.state_bytes() == 0
    tracker.snapshot_pre_step("fc", w, E4M3, 1.0)  # the hooks' way: the grad comes at the post-step
    assert tracker.state_bytes() == w.numel()
    tracker.snapshot_pre_step("wide", torch.randn(10), FLOAT16, 1.0)
    assert tracker.state_bytes() == w.numel() + 4 * 10  # formats above 8 bits: int32 codes
    predicting = WeightFlipTracker(predict_stall=True)
    predicting.snapshot_pre_step("fc", w, E4M3, 1.0)
    assert predicting.state_bytes() == (1 + 4) * w.numel()  # + the float copy for dw


def test_second_snapshot_replaces_the_first_and_invalidate_drops_it() -> None:
    tracker = WeightFlipTracker()
    w = torch.ones(4)
    tracker.snapshot_pre_step("fc", w, E5M2, 1.0, grad=torch.ones(4))  # e.g. a step skipped after this
    tracker.snapshot_pre_step("fc", w, E5M2, 1.0, grad=torch.tensor([1.0, 0.0, 0.0, 0.0]))
    tracker.record_post_step("fc", w, E5M2, 1.0)
    assert tracker.update_counts == {"fc": 1}
    assert tracker.pop_step_counts()["fc"]["updates"] == 1
    tracker.snapshot_pre_step("fc", w, E5M2, 1.0, grad=torch.ones(4))
    tracker.invalidate("fc")
    assert tracker.update_counts == {"fc": 1} and tracker.state_bytes() == 0
    with pytest.raises(ValueError, match="no snapshot"):
        tracker.record_post_step("fc", w, E5M2, 1.0)


# ---- intervals, metrics, reset, state_dict -------------------------------------------------------------


def test_pop_step_counts_reads_an_interval_and_keeps_totals() -> None:
    tracker = WeightFlipTracker()
    w = torch.ones(4)
    _step(tracker, "fc", w, torch.tensor([2.0, 1.0, 1.0, 1.0]), grad=torch.ones(4))
    _step(tracker, "fc", w, torch.tensor([4.0, 2.0, 1.0, 1.0]), grad=torch.ones(4))
    counts = tracker.pop_step_counts()
    assert counts["fc"] == {
        "flips": 3, "updated_flips": 3, "drift_flips": 0, "updates": 8, "grid_steps": 4 + 4 + 4,
        "steps": 2, "element_steps": 8, "stall_ratio": 1 - 3 / 8, "flip_rate": 3 / 8, "update_ulps": 12 / 8,
    }  # fmt: skip
    assert tracker.step_counts()["fc"]["flips"] == 0
    _step(tracker, "fc", w, torch.tensor([4.0, 2.0, 2.0, 1.0]), grad=torch.ones(4))
    assert tracker.pop_step_counts()["fc"]["flips"] == 1
    assert tracker.get_flip_counts() == {"fc": 4}


def test_step_metrics_use_the_run_folder_keys() -> None:
    tracker = WeightFlipTracker()
    _step(tracker, "a", torch.ones(4), torch.tensor([2.0, 1.0, 1.0, 1.0]), grad=torch.ones(4))
    _step(tracker, "b", torch.ones(2), torch.tensor([2.0, 2.0]), grad=torch.tensor([1.0, 0.0]))
    metrics = tracker.pop_step_metrics()
    assert metrics["flips/a"] == 1 and metrics["updates/a"] == 4 and metrics["stall_ratio/a"] == 0.75
    assert metrics["drift_flips/b"] == 1 and metrics["flip_rate/b"] == 1.0 and metrics["stall_ratio/b"] == 0.0
    assert metrics["flips/total"] == 3 and metrics["updates/total"] == 5
    assert metrics["stall_ratio/mean"] == pytest.approx((0.75 + 0.0) / 2)
    assert metrics["flip_rate/mean"] == pytest.approx((0.25 + 1.0) / 2)


def test_reset_forgets_everything() -> None:
    tracker = WeightFlipTracker()
    _step(tracker, "fc", torch.ones(4), torch.full((4,), 2.0), grad=torch.ones(4))
    tracker.reset()
    assert tracker.get_flip_counts() == {} and tracker.update_counts == {} and tracker.state_bytes() == 0
    with pytest.raises(ValueError, match="no snapshot"):
        tracker.compute_flips_post_step("fc", torch.ones(4), E5M2, 1.0)


def test_state_dict_round_trip_continues_the_counts() -> None:
    tracker = WeightFlipTracker()
    w = torch.ones(4)
    _step(tracker, "fc", w, torch.tensor([2.0, 1.0, 1.0, 1.0]), grad=torch.tensor([1.0, 1.0, 0.0, 0.0]))
    state = json.loads(json.dumps(tracker.state_dict()))  # plain data
    resumed = WeightFlipTracker()
    resumed.load_state_dict(state)
    assert resumed.get_flip_counts() == {"fc": 1} and resumed.update_counts == {"fc": 2}
    with pytest.raises(ValueError, match="no snapshot"):  # codes are not saved: snapshot first
        resumed.compute_flips_post_step("fc", w, E5M2, 1.0)
    for t in (tracker, resumed):
        _step(t, "fc", w.clone(), torch.tensor([2.0, 2.0, 1.0, 1.0]), grad=torch.ones(4))
    assert resumed.state_dict() == tracker.state_dict()
    assert resumed.get_flip_rates() == tracker.get_flip_rates() == {"fc": 2 / 8}
    with pytest.raises(ValueError, match="state"):
        resumed.load_state_dict({"layers": {}})


# ---- a real optimizer, checked against quantized values ------------------------------------------------


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(16, 12)
    x[:, :3] = 0.0  # three input features never active: those weight columns get no gradient, only decay
    return x, torch.randn(16, 4)


def _independent_counts(model: nn.Module, steps: int, track) -> dict[str, dict[str, int]]:
    """Flips from quantize() values before/after each AdamW step; updates from |grad| > 1e-10."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.5)
    weights = {name: p for name, p in model.named_parameters() if p.ndim >= 2}
    counts = {name: dict(flips=0, updates=0, updated_flips=0, drift_flips=0) for name in weights}
    for _ in range(steps):
        x, y = _batch()
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        before = {name: quantize(w.detach(), E5M2, 0.25) for name, w in weights.items()}
        updated = {name: w.grad.abs() > 1e-10 for name, w in weights.items()}
        track(optimizer, weights, "pre")
        optimizer.step()
        track(optimizer, weights, "post")
        for name, w in weights.items():
            changed = quantize(w.detach(), E5M2, 0.25) != before[name]
            c = counts[name]
            c["flips"] += int(changed.sum())
            c["updates"] += int(updated[name].sum())
            c["updated_flips"] += int((changed & updated[name]).sum())
            c["drift_flips"] += int((changed & ~updated[name]).sum())
    return counts


def _check(tracker: WeightFlipTracker, expected: dict[str, dict[str, int]], rename=lambda n: n) -> None:
    assert tracker.get_flip_counts() == {rename(n): c["flips"] for n, c in expected.items()}
    assert tracker.update_counts == {rename(n): c["updates"] for n, c in expected.items()}
    assert tracker.get_drift_flip_counts() == {rename(n): c["drift_flips"] for n, c in expected.items()}
    assert tracker.get_stall_ratios() == {
        rename(n): 1 - c["updated_flips"] / c["updates"] for n, c in expected.items()
    }
    assert sum(c["drift_flips"] for c in expected.values()) > 0  # the test exercises drift
    assert all(0 < c["flips"] < c["updates"] for c in expected.values())  # and partial stalls


def test_tracker_matches_quantized_values_in_a_training_loop() -> None:
    tracker = WeightFlipTracker()

    def track(optimizer, weights, phase):
        for name, w in weights.items():
            if phase == "pre":
                tracker.snapshot_pre_step(name, w, E5M2, 0.25, grad=w.grad)
            else:
                tracker.record_post_step(name, w, E5M2, 0.25)

    expected = _independent_counts(_mlp(), steps=5, track=track)
    _check(tracker, expected)


def test_attached_tracker_matches_quantized_values() -> None:
    model = _mlp()
    hooks_holder = {}

    def track(optimizer, weights, phase):
        if "hooks" not in hooks_holder:
            hooks_holder["hooks"] = attach_flip_tracker(
                model, optimizer, default_format=E5M2, default_scale=0.25
            )

    expected = _independent_counts(model, steps=5, track=track)
    hooks = hooks_holder["hooks"]
    assert set(hooks.layers) == {"0", "2", "4"} and hooks.layers["0"] == "0.weight"
    _check(hooks.tracker, expected, rename=lambda n: n.removesuffix(".weight"))


def test_codes_from_the_quantized_forward_count_the_same_with_one_encode_per_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The trainer's path: delayed scaling (a new scale each step), the forward's codes at the snapshot."""
    from altgrad.integration import LayerQuantSpec, QuantizedLinear

    calls = _count_encodes(monkeypatch)
    model = _mlp()
    for i in (0, 2, 4):
        model[i] = QuantizedLinear(model[i], LayerQuantSpec(weight=E4M3, scaling="delayed"))
        model[i].keep_weight_codes = True
    layers = {str(i): model[i] for i in (0, 2, 4)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.5)
    tracker = WeightFlipTracker()
    expected = {name: dict(flips=0, updates=0, updated_flips=0, drift_flips=0) for name in layers}
    for _ in range(5):
        x, y = _batch()
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        scales = {name: layer.weight_scale() for name, layer in layers.items()}
        before = {name: quantize(layer.weight.detach(), E4M3, scales[name]) for name, layer in layers.items()}
        for name, layer in layers.items():
            tracker.snapshot_pre_step(name, layer.weight, E4M3, scales[name], codes=layer.take_weight_codes())
        optimizer.step()
        for name, layer in layers.items():
            tracker.record_post_step(name, layer.weight, E4M3, scales[name], grad=layer.weight.grad)
            changed = quantize(layer.weight.detach(), E4M3, scales[name]) != before[name]
            updated = layer.weight.grad.abs() > 1e-10
            c = expected[name]
            c["flips"] += int(changed.sum())
            c["updates"] += int(updated.sum())
            c["updated_flips"] += int((changed & updated).sum())
            c["drift_flips"] += int((changed & ~updated).sum())
    assert len(calls) == 5 * len(layers)  # the post-step encode only
    _check(tracker, expected)


def test_handed_codes_must_be_the_formats_codes_of_the_weight() -> None:
    tracker = WeightFlipTracker()
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="are not E4M3 codes"):
        tracker.snapshot_pre_step("fc", w, E4M3, 1.0, codes=torch.zeros(3, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="are not E4M3 codes"):
        tracker.snapshot_pre_step("fc", w, E4M3, 1.0, codes=torch.zeros(4, 3, dtype=torch.int32))
    negative_zero = torch.full((4, 3), 0x80, dtype=torch.uint8)  # -0, as a forward may produce
    tracker.snapshot_pre_step("fc", torch.zeros(4, 3), E4M3, 1.0, codes=negative_zero)
    assert tracker.compute_flips_post_step("fc", torch.zeros(4, 3), E4M3, 1.0) == 0


def test_toggling_predict_stall_predicts_over_the_predicting_steps_only() -> None:
    torch.manual_seed(1)
    w = torch.rand(4096) * 0.2 + 1.4  # inside one E4M3 binade (ulp 0.125), also after the steps
    grads = [torch.randn_like(w).clamp_(-4, 4) for _ in range(3)]
    tracker = WeightFlipTracker(predict_stall=False)
    weight = w.clone()
    _step(tracker, "fc", weight, weight - 0.01 * grads[0], grad=grads[0], fmt=E4M3)  # not predicted
    tracker.predict_stall = True
    before = weight.clone()
    _step(tracker, "fc", weight, weight - 0.02 * grads[1], grad=grads[1], fmt=E4M3)  # predicted
    dw = (weight - before).numpy()
    expected = 1.0 - float(np.minimum(1.0, np.abs(dw) / 0.125).mean())  # every element is updated
    tracker.predict_stall = False
    tracker.snapshot_pre_step("fc", weight, E4M3, 1.0, grad=grads[2])  # no copy taken: not predicted
    tracker.predict_stall = True
    tracker.record_post_step("fc", weight - 0.01 * grads[2], E4M3, 1.0)
    counts = tracker.pop_step_counts()["fc"]
    assert counts["updates"] == 3 * 4096 and counts["predicted_updates"] == 4096
    assert counts["predicted_stall_ratio"] == pytest.approx(expected, abs=1e-6)
    state = tracker.state_dict()
    assert state["layers"]["fc"]["predicted_updates"] == [4096, 0]
    legacy = {"version": 2, "layers": {"fc": dict(state["layers"]["fc"])}}  # before predicted updates
    del legacy["layers"]["fc"]["predicted_updates"]
    resumed = WeightFlipTracker(predict_stall=True)
    resumed.load_state_dict(legacy)
    assert resumed.state_dict()["layers"]["fc"]["predicted_updates"] == [
        3 * 4096,
        0,
    ]  # rows with expected flips


# ---- attach_flip_tracker ------------------------------------------------------------------------------


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    for _ in range(steps):
        x, y = _batch()
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def test_attach_with_a_mapping_and_remove() -> None:
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    hooks = attach_flip_tracker(
        model, optimizer, formats={"2.weight": (E4M3, 0.5), "2.bias": "E5M2"}, default_format=None
    )
    _train(model, optimizer)
    assert set(hooks.tracker.get_flip_counts()) == {"2", "2.bias"}
    assert hooks.tracker.update_counts["2"] == 2 * 32 * 32
    hooks.remove()
    _train(model, optimizer)
    assert hooks.tracker.update_counts["2"] == 2 * 32 * 32
    with pytest.raises(ValueError, match="not parameters"):
        attach_flip_tracker(model, optimizer, formats={"nope.weight": "E4M3"})
    with pytest.raises(ValueError, match="unknown format"):
        attach_flip_tracker(model, optimizer, default_format="E4M9Q")


def test_attach_with_a_callable_and_frozen_parameters() -> None:
    model = _mlp()
    model[4].weight.requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[str] = []

    def formats(name: str, p: nn.Parameter):
        seen.append(name)
        return (E5M2, p.detach().abs().amax() / E5M2.max_finite) if name == "0.weight" else None

    hooks = attach_flip_tracker(model, optimizer, formats=formats)
    _train(model, optimizer, steps=3)
    assert set(hooks.tracker.get_flip_counts()) == {"0"}
    assert "4.weight" not in seen  # frozen: no gradient, never asked
    assert hooks.tracker.pop_step_counts()["0"]["steps"] == 3


# ---- every optimizer and loop, against codes from ml_dtypes ---------------------------------------------

SCALE = 2.0**-8  # E4M3 at a fixed scale: the MLP's weights (|w| < 0.6) sit well inside the range


def _ml_dtypes_codes(w: torch.Tensor) -> np.ndarray:
    """E4M3 (OCP float8_e4m3fn) codes of w / SCALE by ml_dtypes, -0 as +0: the independent encoder."""
    codes = (w.detach().numpy() / SCALE).astype(ml_dtypes.float8_e4m3fn).view(np.uint8).copy()
    codes[codes == 0x80] = 0
    return codes


def _ordinal(codes: np.ndarray) -> np.ndarray:
    """Sign-magnitude codes as a monotone integer: +-(code & 0x7f)."""
    magnitude = (codes & 0x7F).astype(np.int64)
    return np.where(codes & 0x80, -magnitude, magnitude)


class _Wrapper(torch.optim.Optimizer):
    """Like accelerate's AcceleratedOptimizer: an Optimizer subclass that never ran Optimizer.__init__
    and holds the real optimizer as ``.optimizer``."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    @property
    def param_groups(self):  # type: ignore[override]
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):  # type: ignore[override]
        return self.optimizer.step(closure)


def _run_and_count(kind: str, steps: int = 6) -> tuple[WeightFlipTracker, dict[str, dict[str, int]]]:
    """Train the MLP with ``kind``'s optimizer and loop, a tracker attached; count independently."""
    model = _mlp()
    if kind == "lbfgs":
        optimizer = torch.optim.LBFGS(model.parameters(), lr=0.05, max_iter=2)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.5, fused=kind == "fused")
    stepper = _Wrapper(optimizer) if kind == "wrapper" else optimizer
    tracker = WeightFlipTracker()
    attach_flip_tracker(model, stepper, default_format=E4M3, default_scale=SCALE, tracker=tracker)
    weights = {name.removesuffix(".weight"): p for name, p in model.named_parameters() if p.ndim >= 2}
    counts = {n: dict(flips=0, updates=0, updated_flips=0, drift_flips=0, grid_steps=0) for n in weights}
    for _ in range(steps):
        x, y = _batch()

        def closure(x=x, y=y):
            stepper.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        before = {name: _ml_dtypes_codes(w) for name, w in weights.items()}
        if kind in ("closure", "lbfgs"):
            stepper.step(closure)  # the gradients are made inside step
        else:
            closure()
            stepper.step()
        for name, w in weights.items():
            after = _ml_dtypes_codes(w)
            changed = after != before[name]
            updated = w.grad.abs().numpy() > 1e-10  # the gradient the step used
            c = counts[name]
            c["flips"] += int(changed.sum())
            c["updates"] += int(updated.sum())
            c["updated_flips"] += int((changed & updated).sum())
            c["drift_flips"] += int((changed & ~updated).sum())
            c["grid_steps"] += int(np.abs(_ordinal(after) - _ordinal(before[name])).sum())
    return tracker, counts


@pytest.mark.parametrize("kind", ["plain", "fused", "closure", "wrapper", "lbfgs"])
def test_flips_match_an_independent_count_under_every_optimizer_and_loop(kind: str) -> None:
    tracker, expected = _run_and_count(kind)
    got = tracker.step_counts()
    for name, c in expected.items():
        assert {key: got[name][key] for key in c} == c, name
        assert got[name]["steps"] == 6
        assert got[name]["update_ulps"] == c["grid_steps"] / got[name]["element_steps"]
    assert all(c["flips"] > 0 for c in expected.values())  # a fused step that went unseen would fail here
    if kind != "lbfgs":
        assert all(0 < c["updated_flips"] < c["updates"] for c in expected.values())  # partial stalls
        assert sum(c["drift_flips"] for c in expected.values()) > 0


def test_update_ulps_by_hand() -> None:
    tracker = WeightFlipTracker()
    w = torch.tensor([1.0, 1.0, -1.0, 0.0])  # E5M2 around 1: 1.25, 1.5, 1.75, 2 above; 0.875 below
    # 2 and 1 grid steps; -1 -> +1 passes every value of magnitude < 1 on both sides: 1.0 is the
    # 61st non-negative value (positions 0..60: 0, 59 below 1), so 2 * 60 steps; -0 is +0: 0 steps
    _step(tracker, "fc", w, torch.tensor([1.5, 0.875, 1.0, -0.0]))
    assert tracker.step_counts()["fc"]["update_ulps"] == (2 + 1 + 120 + 0) / 4
    assert tracker.pop_step_metrics()["update_ulps/mean"] == (2 + 1 + 120 + 0) / 4


def test_predicted_stall_ratio_is_the_formula_over_updated_elements() -> None:
    torch.manual_seed(1)
    w = torch.rand(4096) * 0.5 + 1.25  # inside one E4M3 binade: ulp 0.125
    grad = torch.randn_like(w).masked_fill_(torch.rand_like(w) < 0.3, 0.0)
    tracker = WeightFlipTracker(predict_stall=True)
    new = w - 0.1 * grad
    _step(tracker, "fc", w.clone(), new, grad=grad, fmt=E4M3)
    updated = (grad.abs() > 1e-10).numpy()
    dw = (new - w).numpy()[updated]
    expected = 1.0 - float(np.minimum(1.0, np.abs(dw) / 0.125).mean())
    metrics = tracker.pop_step_metrics()
    assert metrics["predicted_stall_ratio/fc"] == pytest.approx(expected, abs=1e-6)
    assert metrics["predicted_stall_ratio/mean"] == metrics["predicted_stall_ratio/fc"]
    assert metrics["predicted_stall_ratio/fc"] == pytest.approx(metrics["stall_ratio/fc"], abs=0.03)
    assert "predicted_stall_ratio/mean" not in WeightFlipTracker().step_metrics({})


def test_a_wrapper_without_an_optimizer_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="optimizer"):
        attach_flip_tracker(_mlp(), object())
