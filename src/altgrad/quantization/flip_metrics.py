"""Bit flips of quantized weights: which codes an optimizer step changed, and which updates stalled.

For a weight kept in a low-precision format, an optimizer step matters only where it changes the
stored code. Per layer and step:

    flips          elements whose code (in the weight's format, at its scale) changed
    updates        attempted updates: elements with |grad| > 1e-10
    stall ratio    1 - (flips among updated elements) / updates
    drift flips    flips of elements with no gradient (weight decay pulling them across a boundary)
    flip rate      flips / elements

-0 and +0 are one value, so the tracker stores -0 as +0: a zero changing sign is not a flip.

``WeightFlipTracker`` keeps, per layer, only the integer codes of the latest weight it saw (uint8, one
byte per element, for formats of <= 8 bits; never a float copy) plus, between ``snapshot_pre_step``
and the post-step call, the boolean mask of updated elements. Counts accumulate as device tensors; the
host syncs only when counts are read, once for all layers.

Encode once per step: the codes computed after step t are remembered with the weight's identity and
version counter (``weight._version``, bumped by every in-place change such as the optimizer's). When
step t+1's snapshot sees the same tensor at the same version, format and scale, it reuses them instead
of encoding again. (Writes through ``weight.data`` bypass the version counter: after such a write call
``tracker.invalidate(name)``. A new scale tensor, or an in-place change of a tensor scale, re-encodes.)

Usage in any training loop::

    tracker = WeightFlipTracker()
    weights = {n: p for n, p in model.named_parameters() if p.ndim >= 2}
    for step, batch in enumerate(loader, start=1):
        loss = model(batch)
        loss.backward()
        for name, w in weights.items():
            tracker.snapshot_pre_step(name, w, "E4M3", scale=1.0, grad=w.grad)
        optimizer.step()
        for name, w in weights.items():
            tracker.record_post_step(name, w, "E4M3", scale=1.0)     # no host sync
        optimizer.zero_grad()
        if step % 100 == 0:
            log(tracker.pop_step_metrics())                        # one sync: flips/..., stall_ratio/...

or let the optimizer's step hooks do both calls: ``hooks = attach_flip_tracker(model, optimizer)``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .formats import FloatFormat, get_format
from .ops import encode

ScaleLike = float | torch.Tensor
FormatLike = str | FloatFormat

UPDATE_THRESHOLD = 1e-10
"""An element counts as an attempted update when |grad| exceeds this."""

COUNT_NAMES: tuple[str, ...] = ("flips", "updated_flips", "drift_flips", "updates")
"""The columns of each layer's count tensor."""
_FLIPS, _UPDATED_FLIPS, _DRIFT_FLIPS, _UPDATES = range(len(COUNT_NAMES))
_TOTAL, _INTERVAL = 0, 1  # rows: since the start (or reset) / since the last pop_step_counts


def compute_flip_rate(prev_quantized: torch.Tensor, curr_quantized: torch.Tensor) -> float:
    """Fraction of elements whose quantized value (or integer code) differs between two tensors.

    Values compare as numbers (so -0 == +0); NaN in both at the same place counts as unchanged.
    An empty tensor gives 0.0. One host sync.

    >>> compute_flip_rate(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 2.5, 3.0, 4.0]))
    0.25
    """
    if prev_quantized.shape != curr_quantized.shape:
        raise ValueError(
            f"curr_quantized: shape {tuple(curr_quantized.shape)} differs from prev_quantized "
            f"{tuple(prev_quantized.shape)}"
        )
    if prev_quantized.numel() == 0:
        return 0.0
    changed = prev_quantized != curr_quantized
    if prev_quantized.is_floating_point() or curr_quantized.is_floating_point():
        changed &= ~(torch.isnan(prev_quantized) & torch.isnan(curr_quantized))
    return torch.count_nonzero(changed).item() / prev_quantized.numel()


def compute_stall_ratio(flips: int, updates: int) -> float:
    """Fraction of attempted updates that did not change the code: ``1 - flips / updates`` in [0, 1].

    0.0 when there were no updates (never NaN).

    >>> compute_stall_ratio(25, 100), compute_stall_ratio(0, 0)
    (0.75, 0.0)
    """
    flips, updates = float(flips), float(updates)
    if updates <= 0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - flips / updates))


class MissingSnapshotError(KeyError, ValueError):
    """A post-step call for a layer with no pending ``snapshot_pre_step`` (a KeyError and a ValueError)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None where it has none (inference tensors)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


@dataclass
class _Codes:
    """Codes of one weight tensor, with what they depend on so a later call can tell if they are current."""

    codes: torch.Tensor
    format: FloatFormat
    weight: weakref.ref
    version: int | None
    data_ptr: int
    scale: ScaleLike
    scale_version: int | None

    def is_current(self, weight: torch.Tensor, fmt: FloatFormat, scale: ScaleLike) -> bool:
        """True when ``weight`` is the same tensor, unchanged since encoding, at the same format and scale."""
        if self.version is None or self.weight() is not weight or fmt != self.format:
            return False
        if _version(weight) != self.version:
            return False
        if weight.data_ptr() != self.data_ptr or weight.shape != self.codes.shape:
            return False
        if isinstance(scale, torch.Tensor) or isinstance(self.scale, torch.Tensor):
            same_tensor = scale is self.scale and self.scale_version is not None
            return same_tensor and _version(scale) == self.scale_version
        return float(scale) == self.scale


@dataclass
class _Layer:
    """Everything the tracker keeps for one layer."""

    counts: torch.Tensor  # (2, 4) int64: rows _TOTAL / _INTERVAL, columns COUNT_NAMES
    steps: int = 0
    element_steps: int = 0
    interval_steps: int = 0
    interval_element_steps: int = 0
    has_updates: bool = False
    latest: _Codes | None = None  # codes of the latest weight seen (a snapshot, or after a post-step)
    snapshot: _Codes | None = None  # the pre-step codes, until the post-step call
    updated: torch.Tensor | None = None  # |grad| > UPDATE_THRESHOLD, until the post-step call
    pending_updates: torch.Tensor | None = field(default=None, repr=False)  # counted at the snapshot

    def nbytes(self) -> int:
        held = {id(c.codes): c.codes.nbytes for c in (self.latest, self.snapshot) if c is not None}
        return sum(held.values()) + (0 if self.updated is None else self.updated.nbytes)


def _encode(weight: torch.Tensor, fmt: FloatFormat, scale: ScaleLike) -> _Codes:
    """Codes of ``weight`` in ``fmt`` at ``scale``, with -0 stored as +0 (no host sync)."""
    codes = encode(weight.detach(), fmt, scale, check_nan=False)
    if fmt.has_negative_zero:
        codes = codes.masked_fill_(codes == 1 << (fmt.exponent_bits + fmt.mantissa_bits), 0)
    return _Codes(
        codes=codes,
        format=fmt,
        weight=weakref.ref(weight),
        version=_version(weight),
        data_ptr=weight.data_ptr(),
        scale=scale if isinstance(scale, torch.Tensor) else float(scale),
        scale_version=_version(scale) if isinstance(scale, torch.Tensor) else None,
    )


class WeightFlipTracker:
    """Counts code flips, attempted updates, stalls and drift flips per layer across optimizer steps.

    Per step and layer: ``snapshot_pre_step`` before ``optimizer.step()``, then ``record_post_step``
    (no sync; the trainer's path) or ``compute_flips_post_step`` (returns this step's flips as an int,
    one sync). Read the counts since the start with ``get_flip_counts`` & co., or this logging
    interval's with ``pop_step_counts``/``pop_step_metrics``; each read is one sync for all layers.
    """

    def __init__(self) -> None:
        self._layers: dict[str, _Layer] = {}

    # ---- per step -----------------------------------------------------------------------------------

    def snapshot_pre_step(
        self,
        name: str,
        weight: torch.Tensor,
        format: FormatLike,
        scale: ScaleLike,
        grad: torch.Tensor | None = None,
    ) -> None:
        """Remember the codes of ``weight`` before the optimizer step; count its attempted updates.

        With ``grad``, elements with ``|grad| > 1e-10`` are added to ``update_counts[name]`` (the entry
        exists from the first snapshot with a grad) and flips are split into updated and drift flips;
        without it, flips are counted but not split. A second snapshot before the post-step call
        replaces the first (its updates are taken back).
        """
        fmt = get_format(format)
        if not weight.is_floating_point():
            raise ValueError(f"layer {name!r}: weight must be a floating-point tensor, got {weight.dtype}")
        if grad is not None and grad.shape != weight.shape:
            raise ValueError(
                f"layer {name!r}: grad shape {tuple(grad.shape)} differs from weight {tuple(weight.shape)}"
            )
        cached = self._layers[name].latest if name in self._layers else None
        codes = (
            cached
            if cached is not None and cached.is_current(weight, fmt, scale)
            else _encode(weight, fmt, scale)
        )
        layer = self._layer(name, weight.device)  # created only once the inputs encoded cleanly
        if layer.pending_updates is not None:  # the previous snapshot never got its post-step call
            layer.counts[:, _UPDATES] -= layer.pending_updates
            layer.pending_updates = None
        layer.latest = layer.snapshot = codes
        layer.updated = None
        if grad is not None:
            grad = grad.detach().to_dense() if grad.is_sparse else grad.detach()
            layer.updated = grad.abs() > UPDATE_THRESHOLD
            layer.pending_updates = torch.count_nonzero(layer.updated)
            layer.counts[:, _UPDATES] += layer.pending_updates
            layer.has_updates = True

    def record_post_step(
        self, name: str, weight: torch.Tensor, format: FormatLike, scale: ScaleLike
    ) -> torch.Tensor:
        """Count this step's flips of ``name`` against its snapshot, as tensors; no host sync.

        Returns this step's flips as a 0-dim int64 tensor. The new codes become the next step's
        pre-step codes (encode once per step).
        """
        layer = self._layers.get(name)
        if layer is None or layer.snapshot is None:
            waiting = sorted(n for n, s in self._layers.items() if s.snapshot is not None)
            raise MissingSnapshotError(
                f"layer {name!r}: no snapshot_pre_step since its last post-step call "
                f"(layers with a snapshot: {waiting})"
            )
        before = layer.snapshot
        if weight.shape != before.codes.shape:
            raise ValueError(
                f"layer {name!r}: weight shape changed from {tuple(before.codes.shape)} at the snapshot "
                f"to {tuple(weight.shape)}"
            )
        fmt = get_format(format)
        if fmt != before.format:
            raise ValueError(
                f"layer {name!r}: format {fmt.name} differs from the snapshot's {before.format.name}"
            )
        if before.is_current(weight, fmt, scale):  # untouched by the step: no flips
            after = before
            flips = torch.zeros((), dtype=torch.int64, device=layer.counts.device)
        else:
            after = _encode(weight, fmt, scale)
            changed = after.codes != before.codes
            flips = torch.count_nonzero(changed)
            if layer.updated is None:
                zero = torch.zeros((), dtype=torch.int64, device=flips.device)
                step_counts = torch.stack([flips, zero, zero, zero])
            else:
                updated_flips = torch.count_nonzero(changed.logical_and_(layer.updated))
                step_counts = torch.stack([flips, updated_flips, flips - updated_flips, flips.new_zeros(())])
            layer.counts += step_counts  # both rows
        layer.latest, layer.snapshot, layer.updated, layer.pending_updates = after, None, None, None
        layer.steps += 1
        layer.interval_steps += 1
        layer.element_steps += weight.numel()
        layer.interval_element_steps += weight.numel()
        return flips

    def compute_flips_post_step(
        self, name: str, weight: torch.Tensor, format: FormatLike, scale: ScaleLike
    ) -> int:
        """Number of elements of ``name`` whose code changed since its snapshot (one host sync)."""
        return int(self.record_post_step(name, weight, format, scale).item())

    def invalidate(self, name: str | None = None) -> None:
        """Forget the cached codes of ``name`` (all layers if None) so the next snapshot encodes afresh."""
        for key in [name] if name is not None else list(self._layers):
            if key in self._layers:
                self._layers[key].latest = None

    # ---- reading counts -------------------------------------------------------------------------------

    def _read(self, row: int) -> dict[str, list[int]]:
        """The count row of every layer as ints, one host sync per device (one in practice)."""
        by_device: dict[torch.device, list[str]] = {}
        for name, layer in self._layers.items():
            by_device.setdefault(layer.counts.device, []).append(name)
        values: dict[str, list[int]] = {}
        for names in by_device.values():
            rows = torch.stack([self._layers[name].counts[row] for name in names]).tolist()
            values.update(zip(names, rows, strict=True))
        return {name: values[name] for name in self._layers}

    def get_flip_counts(self) -> dict[str, int]:
        """Cumulative flips per layer."""
        return {name: row[_FLIPS] for name, row in self._read(_TOTAL).items()}

    def get_drift_flip_counts(self) -> dict[str, int]:
        """Cumulative flips of elements with no gradient (weight-decay drift) per layer."""
        return {name: row[_DRIFT_FLIPS] for name, row in self._read(_TOTAL).items()}

    def get_update_counts(self) -> dict[str, int]:
        """Cumulative attempted updates per layer (layers snapshotted with a grad at least once)."""
        rows = self._read(_TOTAL)
        return {name: rows[name][_UPDATES] for name, layer in self._layers.items() if layer.has_updates}

    @property
    def update_counts(self) -> dict[str, int]:
        """``get_update_counts()``: a fresh dict read from the device counts (a sync on each access)."""
        return self.get_update_counts()

    def get_flip_rates(self) -> dict[str, float]:
        """Cumulative flips / (elements x steps measured) per layer, in [0, 1]."""
        rows = self._read(_TOTAL)
        return {
            name: rows[name][_FLIPS] / layer.element_steps if layer.element_steps else 0.0
            for name, layer in self._layers.items()
        }

    def get_stall_ratios(self) -> dict[str, float]:
        """Per layer, the fraction of attempted updates whose code did not change (0.0 with no updates)."""
        rows = self._read(_TOTAL)
        return {name: compute_stall_ratio(row[_UPDATED_FLIPS], row[_UPDATES]) for name, row in rows.items()}

    def step_counts(self) -> dict[str, dict[str, float]]:
        """This interval's counts per layer (since the last ``pop_step_counts``), one host sync.

        ``{layer: {"flips", "updated_flips", "drift_flips", "updates", "steps", "element_steps",
        "stall_ratio", "flip_rate"}}``: counts summed over the interval's steps (ints), the stall ratio
        of those counts and the flip rate per element and step (floats).
        """
        counts: dict[str, dict[str, float]] = {}
        for name, row in self._read(_INTERVAL).items():
            layer = self._layers[name]
            c: dict[str, float] = dict(zip(COUNT_NAMES, row, strict=True))
            c["steps"], c["element_steps"] = layer.interval_steps, layer.interval_element_steps
            c["stall_ratio"] = compute_stall_ratio(row[_UPDATED_FLIPS], row[_UPDATES])
            c["flip_rate"] = row[_FLIPS] / c["element_steps"] if c["element_steps"] else 0.0
            counts[name] = c
        return counts

    def pop_step_counts(self) -> dict[str, dict[str, float]]:
        """``step_counts()``, then start a new interval."""
        counts = self.step_counts()
        for layer in self._layers.values():
            layer.counts[_INTERVAL].zero_()
            if layer.pending_updates is not None:  # a snapshot awaiting its post-step keeps its updates
                layer.counts[_INTERVAL, _UPDATES] += layer.pending_updates
            layer.interval_steps = layer.interval_element_steps = 0
        return counts

    @staticmethod
    def step_metrics(counts: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """The run folder's keys from ``step_counts()``: per layer and aggregated over layers.

        ``flips/{layer}``, ``updates/{layer}``, ``drift_flips/{layer}`` (summed over the interval's
        steps), ``stall_ratio/{layer}``, ``flip_rate/{layer}`` (flips per element and step), and
        ``flips/total``, ``updates/total``, ``drift_flips/total``, ``stall_ratio/mean`` (over layers with
        updates; 0.0 if none), ``flip_rate/mean`` (over layers measured).
        """
        metrics: dict[str, float] = {}
        stall_ratios, flip_rates = [], []
        for name, c in counts.items():
            metrics[f"flips/{name}"] = c["flips"]
            metrics[f"updates/{name}"] = c["updates"]
            metrics[f"drift_flips/{name}"] = c["drift_flips"]
            metrics[f"stall_ratio/{name}"] = c["stall_ratio"]
            metrics[f"flip_rate/{name}"] = c["flip_rate"]
            if c["updates"] > 0:
                stall_ratios.append(metrics[f"stall_ratio/{name}"])
            if c["element_steps"] > 0:
                flip_rates.append(metrics[f"flip_rate/{name}"])
        metrics["flips/total"] = sum(c["flips"] for c in counts.values())
        metrics["updates/total"] = sum(c["updates"] for c in counts.values())
        metrics["drift_flips/total"] = sum(c["drift_flips"] for c in counts.values())
        metrics["stall_ratio/mean"] = sum(stall_ratios) / len(stall_ratios) if stall_ratios else 0.0
        metrics["flip_rate/mean"] = sum(flip_rates) / len(flip_rates) if flip_rates else 0.0
        return metrics

    def pop_step_metrics(self) -> dict[str, float]:
        """``step_metrics(pop_step_counts())``: what a trainer logs every N steps, one host sync."""
        return self.step_metrics(self.pop_step_counts())

    def state_bytes(self) -> int:
        """Bytes of tensor state held: codes (1 per element for <= 8-bit formats), plus the updated-mask
        (1 per element) only between a snapshot and its post-step call."""
        return sum(layer.nbytes() for layer in self._layers.values())

    # ---- lifecycle ----------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every layer: counts, codes and snapshots."""
        self._layers.clear()

    def state_dict(self) -> dict[str, Any]:
        """Counts and step totals per layer as plain ints (one sync), for checkpoints.

        Codes and pending snapshots are not saved: after loading, the first snapshot of each layer
        encodes its weight afresh, which is what a resumed step needs anyway.
        """
        totals, intervals = self._read(_TOTAL), self._read(_INTERVAL)
        return {
            "version": 1,
            "layers": {
                name: {
                    "counts": totals[name],
                    "interval_counts": intervals[name],
                    "steps": layer.steps,
                    "element_steps": layer.element_steps,
                    "interval_steps": layer.interval_steps,
                    "interval_element_steps": layer.interval_element_steps,
                    "has_updates": layer.has_updates,
                }
                for name, layer in self._layers.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace all counts with those of ``state_dict()``; codes are re-encoded at the next snapshot."""
        if not isinstance(state, Mapping) or state.get("version") != 1 or "layers" not in state:
            raise ValueError("state: not a WeightFlipTracker state_dict (expected version 1 with 'layers')")
        layers: dict[str, _Layer] = {}
        for name, saved in state["layers"].items():
            try:
                counts = torch.tensor([saved["counts"], saved["interval_counts"]], dtype=torch.int64)
                layer = _Layer(
                    counts=counts,
                    steps=int(saved["steps"]),
                    element_steps=int(saved["element_steps"]),
                    interval_steps=int(saved["interval_steps"]),
                    interval_element_steps=int(saved["interval_element_steps"]),
                    has_updates=bool(saved["has_updates"]),
                )
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"state: layer {name!r} is malformed ({error})") from None
            if counts.shape != (2, len(COUNT_NAMES)):
                raise ValueError(f"state: layer {name!r} counts must have {len(COUNT_NAMES)} columns")
            layers[name] = layer
        self._layers = layers

    def _layer(self, name: str, device: torch.device) -> _Layer:
        layer = self._layers.get(name)
        if layer is None:
            counts = torch.zeros(2, len(COUNT_NAMES), dtype=torch.int64, device=device)
            layer = self._layers[name] = _Layer(counts=counts)
        elif layer.counts.device != device:  # loaded from a checkpoint on another device
            layer.counts = layer.counts.to(device)
        return layer


# ---- optimizer hooks ------------------------------------------------------------------------------

FormatAndScale = tuple[FormatLike, ScaleLike]
FormatSpec = Mapping[str, FormatLike | FormatAndScale] | Callable[[str, nn.Parameter], FormatAndScale | None]


def layer_name(parameter_name: str) -> str:
    """The tracker's layer name for a parameter: ``"h.0.attn.c_attn.weight"`` -> ``"h.0.attn.c_attn"``."""
    return parameter_name.removesuffix(".weight") if parameter_name.endswith(".weight") else parameter_name


class FlipTrackerHooks:
    """A tracker on an optimizer's step hooks (see ``attach_flip_tracker``); ``remove()`` detaches it."""

    def __init__(
        self,
        tracker: WeightFlipTracker,
        optimizer: torch.optim.Optimizer,
        parameters: list[tuple[str, str, nn.Parameter]],
        resolve: Callable[[str, nn.Parameter], FormatAndScale | None],
    ) -> None:
        self.tracker = tracker
        self.layers = {layer: name for layer, name, _ in parameters}  # layer name -> parameter name
        self._parameters = parameters
        self._resolve = resolve
        self._in_step: list[tuple[str, nn.Parameter, FormatLike, ScaleLike]] = []
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._in_step = []
        for layer, name, parameter in self._parameters:
            if parameter.grad is None:  # the optimizer will not touch it this step
                continue
            spec = self._resolve(name, parameter)
            if spec is None:
                continue
            fmt, scale = spec
            self.tracker.snapshot_pre_step(layer, parameter, fmt, scale, grad=parameter.grad)
            self._in_step.append((layer, parameter, fmt, scale))

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for layer, parameter, fmt, scale in self._in_step:
            self.tracker.record_post_step(layer, parameter, fmt, scale)
        self._in_step = []

    def remove(self) -> None:
        """Detach the hooks (the tracker and its counts stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def attach_flip_tracker(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    formats: FormatSpec | None = None,
    default_format: FormatLike | None = "E4M3",
    default_scale: ScaleLike = 1.0,
    tracker: WeightFlipTracker | None = None,
) -> FlipTrackerHooks:
    """Track flips of ``model``'s weights through ``optimizer``'s step hooks: a user's loop needs no change.

    Which weights, in which format and at which scale:

    * ``formats=None``: every 2+-dim parameter the optimizer updates, in ``default_format`` at
      ``default_scale``;
    * a mapping ``{parameter name: format or (format, scale)}``: those parameters as given, plus every
      other 2+-dim one in ``default_format`` (``default_format=None`` tracks only the mapping's);
      a tensor scale that the quantizer updates in place is followed;
    * a callable ``(parameter name, parameter) -> (format, scale) or None``, asked before every step
      (``None`` skips the parameter that step): the way to follow a quantizer's changing scale.

    Layers are named after the parameter without its ``.weight`` suffix. A parameter with no gradient
    at a step is skipped that step. Returns a ``FlipTrackerHooks``: ``.tracker`` holds the counts,
    ``.remove()`` detaches.

    Example::

        hooks = attach_flip_tracker(model, optimizer, default_format="E5M2")
        train(model, optimizer)                        # any loop that calls optimizer.step()
        hooks.tracker.get_stall_ratios()               # {'h.0.attn.c_attn': 0.93, ...}
    """
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    named = [(name, p) for name, p in model.named_parameters() if id(p) in in_optimizer and p.requires_grad]
    default = None if default_format is None else (get_format(default_format), default_scale)

    if callable(formats) and not isinstance(formats, Mapping):
        resolve = formats
        parameters = [(layer_name(name), name, p) for name, p in named]
    else:
        given: dict[str, FormatAndScale] = {}
        for key, value in (formats or {}).items():
            fmt, scale = value if isinstance(value, tuple) else (value, default_scale)
            given[key] = (get_format(fmt), scale)
        known = {name for name, _ in model.named_parameters()}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"formats: {unknown} are not parameters of the model; known: {sorted(known)}")
        updated_names = {name for name, _ in named}
        missing = sorted(set(given) - updated_names)
        if missing:
            raise ValueError(f"formats: {missing} are not updated by the optimizer (or do not require grad)")
        chosen = {name: given.get(name, default if p.ndim >= 2 else None) for name, p in named}
        parameters = [(layer_name(name), name, p) for name, p in named if chosen[name] is not None]
        resolve = lambda name, p: chosen[name]  # noqa: E731
    return FlipTrackerHooks(tracker or WeightFlipTracker(), optimizer, parameters, resolve)
