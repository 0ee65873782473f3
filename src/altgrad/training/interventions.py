"""Stability interventions for quantized training, each off by default.

Two tools working on plain tensors and numbers per layer, and the components that put them in a
training step (``PartitionClip``, ``FormatShifter``; see ``altgrad.diagnostics.components``). The run
config turns each on (``stability.relative_grad_clip``, ``stability.format_shift``); both are off by
default.

* **Partition-relative gradient clipping** (``relative_grad_clip``, ``PartitionRelativeClipper``):
  before the optimizer step, each layer's gradient is shrunk so that no element exceeds ``ratio``
  times the dynamic range of the layer's weight format at its current scale::

      limit_i = ratio * fmt.max_finite * scale_i       (scale per-tensor, or per-channel broadcast)
      r       = max_i |g_i| / limit_i                  (one reduction per layer, stays on the device)
      g      <- g / max(r, 1)                          (a uniform shrink: the direction is kept)

  The weight's format at scale ``s`` holds magnitudes up to ``s * max_finite``: a gradient element
  larger than ``ratio`` times that is an outlier that no step on the layer's grid can follow (with
  an SGD-like update and ``lr * ratio <= 1`` it can never carry a weight across more than the whole
  range). Unlike a global norm clip the threshold follows each layer's own partition of the real
  line, so a layer with a small weight scale is protected from a spike a global threshold lets
  through. The factors are tensors; nothing is read on the host until a record is logged.

* **Emergency format shift** (``FormatShiftController``): fed per-layer NaN counts and stall ratios
  at each logged step, it decides when a layer should move to the format with one more mantissa bit
  (``next_format_with_more_mantissa``: E5M2 -> E4M3 -> E3M4 -> ... -> E0M7). A logged step is *bad*
  for a layer when its NaN count exceeds ``nan_threshold`` or its stall ratio is at least
  ``stall_threshold``; after ``warmup_steps``, ``patience`` consecutive bad logged steps trigger a
  shift. The trainer applies the decision (``QuantizedLinear.set_format("weight", d.to_format)``)
  and records ``d.to_event()``. Why a mantissa bit: a stall ratio near 1 means updates are below
  half a grid step, and one more mantissa bit halves the step; the NaN trigger follows the same
  ladder (a layer producing NaNs gets a finer grid, at the price of range -- the event says which
  reason fired so the analysis can tell them apart).

Every record's ``to_event()`` is a JSON-ready dict with ``step``, ``kind`` and ``message`` (the
events.jsonl contract) plus fields::

    {"step": 120, "kind": "format_shift", "message": "h.0.attn: E4M3 -> E3M4 (stall ratio 0.990)",
     "layer": "h.0.attn", "from": "E4M3", "to": "E3M4", "reason": "stall", "value": 0.99}
    {"step": 300, "kind": "format_shift_unavailable", "message": "h.0.attn: E0M7 is unstable (...) but ...",
     "layer": "h.0.attn", "from": "E0M7", "reason": "stall", "value": 0.99}
    {"step": 50, "kind": "partition_clip", "message": "2 layer(s) clipped ...",
     "layers": {"h.0.mlp": 0.31, "h.1.mlp": 0.8}}

Example::

    >>> import torch
    >>> from altgrad.quantization import E4M3, E5M2
    >>> g = torch.tensor([10.0, -2.0])
    >>> relative_grad_clip(g, E4M3, torch.tensor(0.5), ratio=0.01)  # limit 0.01 * 448 * 0.5 = 2.24
    tensor(0.2240)
    >>> g
    tensor([ 2.2400, -0.4480])
    >>> ctl = FormatShiftController(patience=2, stall_threshold=0.9, warmup_steps=0)
    >>> ctl.update(10, stall_ratios={"fc": 0.95}, formats={"fc": E5M2})
    []
    >>> [d.to_event()["to"] for d in ctl.update(11, stall_ratios={"fc": 0.97})]
    ['E4M3']
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from altgrad.diagnostics.components import Component, FlipDiagnostic, QuantStatsDiagnostic, register_component
from altgrad.quantization.formats import FORMATS, FloatFormat, get_format, parse_format
from altgrad.quantization.types import ScaleLike
from altgrad.record import metric_key

if TYPE_CHECKING:
    from altgrad.training.config import RunConfig

# ---- the E/M ladder ------------------------------------------------------------------------------------


def next_format_with_more_mantissa(fmt: FloatFormat | str) -> FloatFormat | None:
    """The registered format with one exponent bit fewer and one mantissa bit more, or None.

    Same total bits and signedness: ``E5M2 -> E4M3``, ``E4M3 -> E3M4``, ..., ``E1M6 -> E0M7``; the
    standard formats step the same way (``float8_e5m2 -> E4M3``, ``float6_e3m2fn -> float6_e2m3fn``).
    Among several registered candidates the canonical ``E{E-1}M{M+1}`` name wins, then registry
    order. ``E0M7`` (no exponent bit left) and formats with no registered neighbour (bfloat16,
    float16, float4_e2m1fn) give None.

    >>> from altgrad.quantization import E4M3, E0M7
    >>> next_format_with_more_mantissa(E4M3).name, next_format_with_more_mantissa(E0M7)
    ('E3M4', None)
    """
    fmt = get_format(fmt)
    if fmt.exponent_bits == 0:
        return None
    candidates = [
        other
        for other in FORMATS.values()
        if other.exponent_bits == fmt.exponent_bits - 1
        and other.mantissa_bits == fmt.mantissa_bits + 1
        and other.signed == fmt.signed
    ]
    if not candidates:
        return None
    canonical = f"E{fmt.exponent_bits - 1}M{fmt.mantissa_bits + 1}"
    return next((c for c in candidates if c.name == canonical), candidates[0])


# ---- partition-relative gradient clipping --------------------------------------------------------------


def _check_ratio(ratio: float) -> float:
    number = isinstance(ratio, (int, float)) and not isinstance(ratio, bool)
    if not number or not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"ratio: must be a finite number > 0, got {ratio!r}")
    return float(ratio)


@torch.no_grad()
def relative_grad_clip(
    grad: torch.Tensor, format: FloatFormat | str, scale: ScaleLike, ratio: float
) -> torch.Tensor:
    """Shrink ``grad`` in place so that ``|g_i| <= ratio * max_finite * scale_i``; returns the factor.

    ``g <- g / max(1, max_i |g_i| / (ratio * max_finite * scale_i))``: one uniform factor per tensor,
    so the gradient's direction is kept. ``scale`` is a float or a tensor broadcastable to ``grad``.
    The factor comes back as a 0-dim float32 tensor on grad's device (no host sync); an inf gradient
    gives factor 0 and a NaN gradient factor NaN (the gradient becomes NaN / 0 -- reported, not hidden).
    """
    fmt = get_format(format)
    ratio = _check_ratio(ratio)
    if isinstance(scale, torch.Tensor):
        limit = scale.detach().to(device=grad.device, dtype=torch.float32) * (ratio * fmt.max_finite)
    else:
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale: must be finite and > 0, got {scale!r}")
        limit = ratio * fmt.max_finite * float(scale)
    excess = (grad.detach().float().abs() / limit).amax()
    factor = excess.clamp(min=1.0).reciprocal()
    grad.mul_(factor.to(grad.dtype))
    return factor


@dataclass
class ClipRecord:
    """The shrink factors of one ``PartitionRelativeClipper.clip_`` call (``factors[i]`` for ``names[i]``)."""

    step: int
    names: list[str]
    factors: torch.Tensor

    def to_metrics(self) -> dict[str, float]:
        """``{"clip_factor/{name}": factor}`` (one host sync)."""
        factors = zip(self.names, self.factors.tolist(), strict=True)
        return {metric_key("clip_factor", name): value for name, value in factors}

    def to_event(self) -> dict | None:
        """An events.jsonl record naming the clipped layers, or None if nothing was clipped (one sync)."""
        factors = zip(self.names, self.factors.tolist(), strict=True)
        clipped = {name: value for name, value in factors if not value >= 1.0}  # NaN counts as clipped
        if not clipped:
            return None
        worst = min(clipped, key=lambda n: clipped[n] if math.isfinite(clipped[n]) else -1.0)
        return {
            "step": self.step,
            "kind": "partition_clip",
            "message": f"{len(clipped)} layer(s) clipped relative to their format range; "
            f"strongest {worst} x{clipped[worst]:.3g}",
            "layers": clipped,
        }


class PartitionRelativeClipper:
    """``relative_grad_clip`` over many layers, with per-layer clip counts for the run summary.

    >>> import torch
    >>> from altgrad.quantization import E4M3
    >>> clipper = PartitionRelativeClipper(ratio=0.01)
    >>> g = torch.tensor([10.0, -2.0])
    >>> round(clipper.clip_({"fc": (g, E4M3, 0.5)}, step=3).to_event()["layers"]["fc"], 6)
    0.224
    >>> clipper.summary()
    {'partition_clip_steps/fc': 1}
    """

    def __init__(self, ratio: float) -> None:
        self.ratio = _check_ratio(ratio)
        self.clipped_steps: dict[str, torch.Tensor] = {}

    def clip_(
        self, layers: Mapping[str, tuple[torch.Tensor, FloatFormat, ScaleLike]], step: int
    ) -> ClipRecord:
        """Clip ``{name: (grad, format, scale)}`` in place; the record holds tensors (no sync)."""
        names = list(layers)
        factors = [relative_grad_clip(*layers[name], ratio=self.ratio) for name in names]
        for name, factor in zip(names, factors, strict=True):
            hit = (factor < 1).to(torch.int64)
            self.clipped_steps[name] = self.clipped_steps.get(name, torch.zeros_like(hit)) + hit
        device = factors[0].device if factors else torch.device("cpu")
        stacked = torch.stack([f.to(device) for f in factors]) if factors else torch.ones(0)
        return ClipRecord(step=step, names=names, factors=stacked)

    def summary(self) -> dict[str, int]:
        """``{"partition_clip_steps/{name}": count}`` over the run so far (one sync)."""
        if not self.clipped_steps:
            return {}
        device = next(iter(self.clipped_steps.values())).device
        counts = torch.stack([c.to(device) for c in self.clipped_steps.values()]).tolist()
        steps = zip(self.clipped_steps, counts, strict=True)
        return {metric_key("partition_clip_steps", n): int(c) for n, c in steps}

    def state_dict(self) -> dict:
        return {"ratio": self.ratio, "clipped_steps": {n: c.cpu() for n, c in self.clipped_steps.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.ratio = _check_ratio(state["ratio"])
        self.clipped_steps = {n: c.clone() for n, c in state["clipped_steps"].items()}


# ---- emergency format shift ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FormatShift:
    """A decision: move ``layer``'s weights from ``from_format`` to ``to_format``.

    ``to_format`` is None only in the notices of ``FormatShiftController.pop_notices`` (a layer that
    is unstable but has no format with one more mantissa bit); ``update`` never returns those.
    """

    layer: str
    from_format: FloatFormat
    to_format: FloatFormat | None
    reason: str  # "nan" or "stall"
    step: int
    value: float  # the NaN count or stall ratio of the step that completed the streak

    def to_event(self) -> dict:
        what = f"NaN count {self.value:g}" if self.reason == "nan" else f"stall ratio {self.value:.3f}"
        event = {"step": self.step, "layer": self.layer, "from": self.from_format.name}
        if self.to_format is None:
            message = (f"{self.layer}: {self.from_format.name} is unstable ({what}) but no registered format "
                       "has one more mantissa bit")
            return {**event, "kind": "format_shift_unavailable", "message": message,
                    "reason": self.reason, "value": self.value}
        message = f"{self.layer}: {self.from_format.name} -> {self.to_format.name} ({what})"
        return {**event, "kind": "format_shift", "message": message, "to": self.to_format.name,
                "reason": self.reason, "value": self.value}


@dataclass
class _LayerWatch:
    format: FloatFormat | None = None
    bad_streak: int = 0
    gave_up_on: str | None = None  # the format already reported as having no successor
    shifts: list[str] = field(default_factory=list)


class FormatShiftController:
    """Decide when a layer's weight format should gain a mantissa bit.

    Call ``update(step, nan_counts=..., stall_ratios=..., formats=...)`` at each logged step with
    per-layer numbers (floats or 0-dim tensors; all tensors are read with one host sync). ``formats``
    gives the layers' current weight formats; it may be passed once (at the first call or to the
    constructor) -- after a decision the controller assumes the trainer applied it -- or every time,
    in which case it is the source of truth. A layer's logged step is bad when its NaN count exceeds
    ``nan_threshold`` (reason ``"nan"``, checked first) or its stall ratio is >= ``stall_threshold``
    (reason ``"stall"``). Steps ``< warmup_steps`` are ignored; ``patience`` consecutive bad logged
    steps return a ``FormatShift`` to ``next_format_with_more_mantissa`` and reset the streak. A layer
    with no such format gets one notice per format (``pop_notices()``, ``to_format=None``).

    A missing number for a layer counts as not bad (no evidence), and so does a NaN stall ratio (no
    update was attempted). ``state_dict``/``load_state_dict`` carry streaks, formats and history.

    Args:
        patience: consecutive bad logged steps before a shift (>= 1).
        stall_threshold: stall ratio in (0, 1] at or above which a step is bad.
        warmup_steps: steps (by the ``step`` argument) during which nothing is counted.
        nan_threshold: a NaN count (or fraction) above this is bad (default 0: any NaN).
        formats: optional initial ``{layer: format}``.
    """

    def __init__(
        self,
        patience: int = 20,
        stall_threshold: float = 0.98,
        warmup_steps: int = 50,
        nan_threshold: float = 0.0,
        formats: Mapping[str, FloatFormat | str] | None = None,
    ) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience: must be an int >= 1, got {patience!r}")
        if isinstance(stall_threshold, bool) or not isinstance(stall_threshold, (int, float)) or not (
            0 < stall_threshold <= 1
        ):
            raise ValueError(f"stall_threshold: must be in (0, 1], got {stall_threshold!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be an int >= 0, got {warmup_steps!r}")
        if not isinstance(nan_threshold, (int, float)) or not (nan_threshold >= 0):
            raise ValueError(f"nan_threshold: must be a number >= 0, got {nan_threshold!r}")
        self.patience = patience
        self.stall_threshold = float(stall_threshold)
        self.warmup_steps = warmup_steps
        self.nan_threshold = float(nan_threshold)
        self._layers: dict[str, _LayerWatch] = {}
        self._notices: list[FormatShift] = []
        self._set_formats(formats or {})

    def _set_formats(self, formats: Mapping[str, FloatFormat | str | None]) -> None:
        for name, fmt in formats.items():
            self._layers.setdefault(name, _LayerWatch()).format = parse_format(fmt)  # "none": unquantized

    def update(
        self,
        step: int,
        nan_counts: Mapping[str, float | torch.Tensor] | None = None,
        stall_ratios: Mapping[str, float | torch.Tensor] | None = None,
        formats: Mapping[str, FloatFormat | str | None] | None = None,
    ) -> list[FormatShift]:
        """Feed one logged step; returns the shifts decided now (usually none).

        Layers whose format is None (not quantized) are skipped. A layer with numbers but no known
        format raises ``ValueError``.
        """
        self._set_formats(formats or {})
        if step < self.warmup_steps:
            return []
        nans, stalls = _read_numbers(nan_counts or {}), _read_numbers(stall_ratios or {})
        unknown = sorted(n for n in {**nans, **stalls} if n not in self._layers)
        if unknown:
            raise ValueError(
                f"layers {unknown} have numbers but no format; pass formats={{name: format}} "
                f"(known layers: {sorted(self._layers)})"
            )
        decisions = []
        for name, watch in self._layers.items():
            if watch.format is None:
                continue
            nan_count, stall = nans.get(name, 0.0), stalls.get(name, math.nan)
            if nan_count > self.nan_threshold or math.isnan(nan_count):
                reason, value = "nan", nan_count
            elif stall >= self.stall_threshold:
                reason, value = "stall", stall
            else:
                watch.bad_streak = 0
                continue
            watch.bad_streak += 1
            if watch.bad_streak < self.patience:
                continue
            watch.bad_streak = 0
            target = next_format_with_more_mantissa(watch.format)
            decision = FormatShift(name, watch.format, target, reason, step, value)
            if target is None:
                if watch.gave_up_on != watch.format.name:
                    watch.gave_up_on = watch.format.name
                    self._notices.append(decision)
                continue
            watch.shifts.append(f"{watch.format.name}->{target.name}@{step}")
            watch.format = target
            decisions.append(decision)
        return decisions

    def pop_notices(self) -> list[FormatShift]:
        """Unstable layers with nowhere to go since the last call (each ``to_event()`` is an event)."""
        notices, self._notices = self._notices, []
        return notices

    def summary(self) -> dict[str, list[str]]:
        """``{layer: ["E5M2->E4M3@120", ...]}`` for the layers that shifted."""
        return {name: list(w.shifts) for name, w in self._layers.items() if w.shifts}

    def state_dict(self) -> dict:
        return {
            name: {"format": w.format.name if w.format else None, "bad_streak": w.bad_streak,
                   "gave_up_on": w.gave_up_on, "shifts": list(w.shifts)}
            for name, w in self._layers.items()
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self._layers = {
            name: _LayerWatch(parse_format(s["format"]), s["bad_streak"],
                              s["gave_up_on"], list(s["shifts"]))
            for name, s in state.items()
        }  # fmt: skip


def _read_numbers(values: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """Floats from floats and 0-dim tensors, with one host sync for all the tensors together."""
    out = {name: float(v) for name, v in values.items() if not isinstance(v, torch.Tensor)}
    tensors = {name: v for name, v in values.items() if isinstance(v, torch.Tensor)}
    if tensors:
        device = next(iter(tensors.values())).device
        stacked = torch.stack([v.detach().reshape(()).float().to(device) for v in tensors.values()])
        out.update(zip(tensors, stacked.tolist(), strict=True))
    return out


# ---- the interventions as components of a training step ------------------------------------------


@register_component
class FormatShifter(Component):
    """``FormatShiftController`` at each logged step with a flip measurement: it reads the stall ratios
    of the ``flips`` component and, when the step's quantization statistics were measured, the weights'
    non-finite fractions of the ``quant_stats`` component (typed values, not parsed keys); it applies
    each shift to the layer and records ``format_shift`` events."""

    name = "format_shift"

    def __init__(self, patience: int = 20, stall_threshold: float = 0.98, warmup_steps: int = 50) -> None:
        self.controller = FormatShiftController(patience, stall_threshold, warmup_steps)

    @classmethod
    def from_config(cls, config: RunConfig) -> FormatShifter | None:
        s = config.stability
        if not s.format_shift:
            return None
        return cls(s.shift_patience, s.shift_stall_threshold, s.shift_warmup_steps)

    def on_log(self, step: int) -> dict[str, float]:
        flips = self.run.components.get(FlipDiagnostic.name)
        if not isinstance(flips, FlipDiagnostic) or not flips.due(step):
            return {}
        quant = self.run.components.get(QuantStatsDiagnostic.name)
        nonfinite = quant.last.nonfinite_fracs("weight") if isinstance(quant, QuantStatsDiagnostic) else {}
        tracked = self.run.tracked()
        stall = {name: c["stall_ratio"] for name, c in flips.last_counts.items() if name in tracked}
        formats = {name: layer.weight_format for name, layer in tracked.items()}
        for shift in self.controller.update(step, stall_ratios=stall, nan_counts=nonfinite, formats=formats):
            tracked[shift.layer].set_format("weight", shift.to_format)
            self.run.event(**shift.to_event())
        for notice in self.controller.pop_notices():
            self.run.event(**notice.to_event())
        return {}

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)


@register_component
class PartitionClip(Component):
    """``PartitionRelativeClipper`` on the quantized weights' gradients before every optimizer step; the
    last step's ``partition_clip`` event at each logged step; clip counts in the run summary."""

    name = "partition_clip"

    def __init__(self, ratio: float) -> None:
        self.clipper = PartitionRelativeClipper(ratio)
        self.last_clip: ClipRecord | None = None

    @classmethod
    def from_config(cls, config: RunConfig) -> PartitionClip | None:
        ratio = config.stability.relative_grad_clip
        return cls(ratio) if ratio is not None else None

    def before_step(self, step: int) -> dict[str, float]:
        grads = {
            name: (layer.weight.grad, layer.weight_format, layer.weight_scale())
            for name, layer in self.run.tracked().items()
            if layer.weight.grad is not None
        }
        self.last_clip = self.clipper.clip_(grads, step=step)
        return {}

    def on_log(self, step: int) -> dict[str, float]:
        if self.last_clip is not None and (event := self.last_clip.to_event()) is not None:
            self.run.event(**event)
        return {}

    def state_dict(self) -> dict[str, Any]:
        return self.clipper.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clipper.load_state_dict(state)

    def summary(self) -> dict[str, Any]:
        return {"partition_clip_steps": self.clipper.summary()}
