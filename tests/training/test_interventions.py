"""Partition-relative gradient clipping and the emergency format-shift controller."""

from __future__ import annotations

import math

import pytest
import torch

from altgrad.quantization import E0M7, E3M4, E4M3, E5M2, get_format
from altgrad.training.interventions import (
    FormatShift,
    FormatShiftController,
    PartitionRelativeClipper,
    next_format_with_more_mantissa,
    relative_grad_clip,
)

# ---- the E/M ladder ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "start, expected",
    [
        ("E7M0", "E6M1"), ("E6M1", "E5M2"), ("E5M2", "E4M3"), ("E4M3", "E3M4"), ("E3M4", "E2M5"),
        ("E2M5", "E1M6"), ("E1M6", "E0M7"), ("E0M7", None),
        ("float8_e5m2", "E4M3"), ("float8_e4m3fn", "E3M4"), ("float8_e5m2fnuz", "E4M3"),
        ("float6_e3m2fn", "float6_e2m3fn"), ("float4_e2m1fn", None), ("bfloat16", None), ("float16", None),
        ("float8_e8m0fnu", None),  # unsigned: no unsigned E7M1 is registered
    ],
)  # fmt: skip
def test_next_format_with_more_mantissa(start, expected):
    found = next_format_with_more_mantissa(start)
    assert (found.name if found else None) == expected
    if found is not None:
        fmt = get_format(start)
        assert found.total_bits == fmt.total_bits and found.mantissa_bits == fmt.mantissa_bits + 1


# ---- relative gradient clipping --------------------------------------------------------------------------


def test_clip_hand_computed_keeps_direction():
    g = torch.tensor([10.0, -2.0])
    factor = relative_grad_clip(g, E4M3, torch.tensor(0.5), ratio=0.01)  # limit 0.01 * 448 * 0.5 = 2.24
    assert factor.item() == pytest.approx(0.224)
    torch.testing.assert_close(g, torch.tensor([2.24, -0.448]))


def test_clip_below_limit_is_untouched():
    g = torch.tensor([1.0, -2.0])
    factor = relative_grad_clip(g, "E5M2", 1.0, ratio=1e-4)  # limit 5.73
    assert factor.item() == 1.0 and g.tolist() == [1.0, -2.0]


def test_clip_per_channel_scale_uses_each_channels_limit():
    g = torch.tensor([[2.0, 1.0], [100.0, 1.0]])
    scale = torch.tensor([[1.0], [100.0]])  # limits 4.48 and 448 at ratio 0.01
    factor = relative_grad_clip(g, E4M3, scale, ratio=0.01)
    assert factor.item() == 1.0  # 2 <= 4.48 and 100 <= 448: nothing exceeds its own channel's limit
    g[0, 0] = 8.96
    factor = relative_grad_clip(g, E4M3, scale, ratio=0.01)
    assert factor.item() == pytest.approx(0.5)
    torch.testing.assert_close(g, torch.tensor([[4.48, 0.5], [50.0, 0.5]]))


def test_clip_reports_non_finite_gradients():
    g = torch.tensor([math.inf, 1.0])
    assert relative_grad_clip(g, E4M3, 1.0, ratio=1.0).item() == 0.0
    assert math.isnan(g[0]) and g[1] == 0.0  # inf * 0: visible as NaN, not replaced
    g = torch.tensor([math.nan, 1.0])
    assert math.isnan(relative_grad_clip(g, E4M3, 1.0, ratio=1.0).item())


@pytest.mark.parametrize("ratio", [0, -1.0, math.inf, math.nan, True, "1"])
def test_clip_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        relative_grad_clip(torch.ones(2), E4M3, 1.0, ratio=ratio)
    with pytest.raises(ValueError, match="ratio"):
        PartitionRelativeClipper(ratio=ratio)


def test_clip_bad_scale_and_format():
    with pytest.raises(ValueError, match="scale"):
        relative_grad_clip(torch.ones(2), E4M3, 0.0, ratio=1.0)
    with pytest.raises(ValueError, match="unknown format"):
        relative_grad_clip(torch.ones(2), "E4M9Q", 1.0, ratio=1.0)


def test_clipper_records_events_and_counts():
    clipper = PartitionRelativeClipper(ratio=0.01)
    a, b = torch.tensor([10.0]), torch.tensor([1.0])
    record = clipper.clip_({"a": (a, E4M3, 0.5), "b": (b, E4M3, 0.5)}, step=7)
    event = record.to_event()
    assert event["step"] == 7 and event["kind"] == "partition_clip" and "a" in event["message"]
    assert list(event["layers"]) == ["a"] and event["layers"]["a"] == pytest.approx(0.224)
    assert record.to_metrics()["clip_factor/b"] == 1.0
    assert clipper.clip_({"a": (torch.tensor([0.1]), E4M3, 0.5)}, step=8).to_event() is None
    clipper.clip_({"a": (torch.tensor([10.0]), E4M3, 0.5)}, step=9)
    assert clipper.summary() == {"partition_clip_steps/a": 2, "partition_clip_steps/b": 0}
    restored = PartitionRelativeClipper(ratio=1.0)
    restored.load_state_dict(clipper.state_dict())
    assert restored.summary() == clipper.summary() and restored.ratio == 0.01


# ---- the format-shift controller ------------------------------------------------------------------------


def controller(**kw) -> FormatShiftController:
    return FormatShiftController(**{"patience": 3, "stall_threshold": 0.9, "warmup_steps": 10, **kw})


def test_shift_after_patience_consecutive_stalls_only():
    ctl = controller(formats={"fc": E4M3, "head": E4M3})
    assert ctl.update(5, stall_ratios={"fc": 1.0, "head": 1.0}) == []  # warmup: not counted
    assert ctl.update(10, stall_ratios={"fc": 0.95, "head": 0.95}) == []
    assert ctl.update(11, stall_ratios={"fc": 0.95, "head": 0.5}) == []  # head's streak resets
    decisions = ctl.update(12, stall_ratios={"fc": 0.99, "head": 0.95})
    assert decisions == [FormatShift("fc", E4M3, E3M4, "stall", 12, 0.99)]
    assert decisions[0].to_event() == {
        "step": 12, "kind": "format_shift", "message": "fc: E4M3 -> E3M4 (stall ratio 0.990)",
        "layer": "fc", "from": "E4M3", "to": "E3M4", "reason": "stall", "value": 0.99,
    }  # fmt: skip
    # the controller assumes the shift was applied: the next one needs a fresh streak, from E3M4
    assert ctl.update(13, stall_ratios={"fc": 0.99, "head": 0.95}) == []
    assert [d.layer for d in ctl.update(14, stall_ratios={"fc": 0.99, "head": 0.95})] == ["head"]
    assert ctl.update(15, stall_ratios={"fc": 0.99})[0].to_format.name == "E2M5"
    assert ctl.summary() == {"fc": ["E4M3->E3M4@12", "E3M4->E2M5@15"], "head": ["E4M3->E3M4@14"]}


def test_nan_counts_trigger_first_and_accept_tensors():
    ctl = controller(patience=2, warmup_steps=0)
    nan = {"fc": torch.tensor(0.25)}  # e.g. the trainer's non-finite fraction
    assert (
        ctl.update(1, nan_counts=nan, stall_ratios={"fc": torch.tensor(0.95)}, formats={"fc": "E5M2"}) == []
    )
    (decision,) = ctl.update(2, nan_counts=nan, stall_ratios={"fc": torch.tensor(0.95)})
    assert (decision.reason, decision.from_format, decision.to_format) == ("nan", E5M2, E4M3)
    assert decision.to_event()["message"] == "fc: E5M2 -> E4M3 (NaN count 0.25)"


def test_formats_passed_each_call_are_the_source_of_truth():
    ctl = controller(patience=1, warmup_steps=0)
    (decision,) = ctl.update(1, stall_ratios={"fc": 1.0}, formats={"fc": E5M2})
    assert decision.to_format is E4M3
    (decision,) = ctl.update(
        2, stall_ratios={"fc": 1.0}, formats={"fc": E5M2}
    )  # the trainer did not apply it
    assert decision.from_format is E5M2
    assert ctl.update(3, stall_ratios={"fc": 1.0}, formats={"fc": None}) == []  # unquantized: skipped
    for no_format in ("none", "FP32", ""):  # every spelling of "no format" (parse_format)
        assert ctl.update(4, stall_ratios={"fc": 1.0}, formats={"fc": no_format}) == []


def test_no_successor_gives_one_notice_per_format():
    ctl = controller(patience=1, warmup_steps=0, formats={"fc": E0M7})
    for step in range(1, 5):
        assert ctl.update(step, stall_ratios={"fc": 1.0}) == []
    (notice,) = ctl.pop_notices()
    assert ctl.pop_notices() == []
    event = notice.to_event()
    assert event["kind"] == "format_shift_unavailable" and event["from"] == "E0M7" and event["step"] == 1
    assert {"step", "kind", "message"} <= set(event) and "to" not in event


def test_missing_or_nan_numbers_are_not_evidence():
    ctl = controller(patience=1, warmup_steps=0, formats={"fc": E4M3})
    assert ctl.update(1, stall_ratios={"fc": math.nan}) == []
    assert ctl.update(2) == []


def test_numbers_for_unknown_layers_raise():
    with pytest.raises(ValueError, match="no format"):
        controller(formats={"fc": E4M3}).update(20, stall_ratios={"other": 1.0})


def test_state_dict_round_trip_continues_the_streak():
    ctl = controller(patience=3, warmup_steps=0, formats={"fc": E4M3})
    ctl.update(1, stall_ratios={"fc": 1.0})
    ctl.update(2, stall_ratios={"fc": 1.0})
    restored = controller(patience=3, warmup_steps=0)
    restored.load_state_dict(ctl.state_dict())
    assert [d.to_format for d in restored.update(3, stall_ratios={"fc": 1.0})] == [E3M4]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"patience": 0}, "patience"),
        ({"patience": 1.5}, "patience"),
        ({"stall_threshold": 0.0}, "stall_threshold"),
        ({"stall_threshold": 1.5}, "stall_threshold"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"nan_threshold": -1}, "nan_threshold"),
        ({"formats": {"fc": "E9M9Z"}}, "unknown format"),
    ],
)
def test_controller_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        controller(**kwargs)
