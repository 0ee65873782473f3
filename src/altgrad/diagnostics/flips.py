"""Bit flips of quantized weights: which codes an optimizer step changed, and which updates stalled.

For a weight kept in a low-precision format, an optimizer step matters only where it changes the
stored code. Both codes of a step are taken at one fixed scale, the weight's scale before the step
(passed to both calls), so a flip is a move of the weight, never a change of scale. Per layer and step:

    flips          elements whose code (in the weight's format, at that scale) changed
    updates        attempted updates: elements with |grad| > 1e-10
    stall ratio    1 - (flips among updated elements) / updates
    drift flips    flips of elements with |grad| <= 1e-10: moved by the optimizer's state (Adam's
                   momentum of earlier gradients) or by weight decay
    flip rate      flips / elements
    update ulps    mean |position(after) - position(before)| per element: grid steps moved, the
                   position being the code's index on the ordered value line (grid_position)
    predicted stall (``predict_stall=True``) 1 - mean over updated elements of min(1, |dw| / ulp),
                   the chance of staying in the grid cell for an off-grid (master) weight

With an fp32 master copy a stall is grid coarseness: the master keeps the update and a later step may
cross the boundary. Only a weight *stored* in the format loses a stalled update.

-0 and +0 are one value (both at grid position 0): a zero changing sign is not a flip.

``WeightFlipTracker`` holds state only between ``snapshot_pre_step`` and the post-step call: the codes
before the step (uint8, one byte per element, for formats of <= 8 bits), the mask of updated elements
if a grad was given at the snapshot (one byte), and with ``predict_stall`` a float copy of the weight.
Both codes are encoded every step (the pre-step ones may be handed in, e.g. by the quantized forward
that computed them): whether a weight changed is never inferred (fused optimizers write weights
without bumping ``param._version``). Counts accumulate as device tensors; the host syncs only
when counts are read, once for all layers.

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

or let the optimizer's step hooks do both calls: ``hooks = attach_flip_tracker(model, optimizer)``
(closure steps and optimizer wrappers included).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from altgrad.quantization.codes import native_encode
from altgrad.quantization.formats import FloatFormat, get_format
from altgrad.quantization.grid import crossing_probability, grid_position
from altgrad.quantization.types import FormatLike, ScaleLike
from altgrad.record import aggregate_key, metric_key

UPDATE_THRESHOLD = 1e-10
"""An element counts as an attempted update when |grad| exceeds this."""

COUNT_NAMES: tuple[str, ...] = ("flips", "updated_flips", "drift_flips", "updates", "grid_steps")
"""The columns of each layer's count tensor (``grid_steps``: summed |position change| of all elements)."""
_FLIPS, _UPDATED_FLIPS, _DRIFT_FLIPS, _UPDATES, _GRID_STEPS = range(len(COUNT_NAMES))
_TOTAL, _INTERVAL = 0, 1  # rows: since the start (or reset) / since the last pop_step_counts
_STATE_VERSION = 3


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


def _mean(values: list[float]) -> float:
    """The mean of ``values``; 0.0 for none (no layer had updates)."""
    return sum(values) / len(values) if values else 0.0


class MissingSnapshotError(KeyError, ValueError):
    """A post-step call for a layer with no pending ``snapshot_pre_step`` (a KeyError and a ValueError)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


@dataclass
class _Snapshot:
    """What the tracker keeps of one weight between ``snapshot_pre_step`` and the post-step call."""

    codes: torch.Tensor  # pre-step codes, -0 stored as +0
    format: FloatFormat
    updated: torch.Tensor | None  # |grad| > UPDATE_THRESHOLD, when a grad was given at the snapshot
    weight: torch.Tensor | None  # float copy of the pre-step weight (predict_stall only)

    def nbytes(self) -> int:
        held = (self.codes, self.updated, self.weight)
        return sum(t.nbytes for t in held if t is not None)


@dataclass
class _Layer:
    """Everything the tracker keeps for one layer."""

    counts: torch.Tensor  # (2, len(COUNT_NAMES)) int64: rows _TOTAL / _INTERVAL
    expected_flips: torch.Tensor  # (2,) float64: summed crossing probability of updated elements
    predicted_updates: torch.Tensor  # (2,) int64: the updates of the steps that made that prediction
    steps: int = 0
    element_steps: int = 0
    interval_steps: int = 0
    interval_element_steps: int = 0
    has_updates: bool = False
    snapshot: _Snapshot | None = None


def _code_dtype(fmt: FloatFormat) -> torch.dtype:
    """The dtype of ``fmt``'s codes (``ops.encode``'s): uint8 up to 8 bits, int32 above."""
    return torch.uint8 if fmt.total_bits <= 8 else torch.int32


def _encode(weight: torch.Tensor, fmt: FloatFormat, scale: ScaleLike) -> torch.Tensor:
    """Codes of ``weight`` in ``fmt`` at ``scale``: ``ops.encode``'s, through torch's float8 cast where
    the format is native (``quantization.codes``); no host sync."""
    return native_encode(weight.detach(), fmt, scale)


def _step_counts(
    before: torch.Tensor, after: torch.Tensor, fmt: FloatFormat, updated: torch.Tensor | None
) -> torch.Tensor:
    """One step's ``COUNT_NAMES`` of a layer from its codes before and after, as one int64 tensor.

    Compared through grid positions: +0 and -0 share position 0 (not a flip) and every other code has
    its own, so positions differ exactly where the value changed, and their difference is the grid
    steps moved. Formats whose -0 code means NaN (fnuz) compare the codes themselves.
    """
    small = torch.int8 if fmt.signed else torch.uint8  # positions of <= 8-bit codes
    if fmt.total_bits > 8:
        small = torch.int32
    wide = torch.int16 if fmt.total_bits <= 8 else torch.int32  # holds a difference of positions
    moved = grid_position(after, fmt, small).to(wide).sub_(grid_position(before, fmt, small)).abs_()
    grid_steps = moved.sum(dtype=torch.int64)
    positions_tell = fmt.has_negative_zero or not fmt.signed
    changed = moved if positions_tell else after != before
    flips = torch.count_nonzero(changed)
    if updated is None:
        zero = flips.new_zeros(())
        return torch.stack([flips, zero, zero, zero, grid_steps])
    changed = changed.mul_(updated) if positions_tell else changed.logical_and_(updated)
    updated_flips = torch.count_nonzero(changed)
    updates = torch.count_nonzero(updated)
    return torch.stack([flips, updated_flips, flips - updated_flips, updates, grid_steps])


def _updated_mask(name: str, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    if grad.shape != weight.shape:
        raise ValueError(
            f"layer {name!r}: grad shape {tuple(grad.shape)} differs from weight {tuple(weight.shape)}"
        )
    grad = grad.detach().to_dense() if grad.is_sparse else grad.detach()
    return grad.abs() > UPDATE_THRESHOLD


class WeightFlipTracker:
    """Counts code flips, attempted updates, stalls, drift flips and grid steps per layer across steps.

    Per step and layer: ``snapshot_pre_step`` before ``optimizer.step()``, then ``record_post_step``
    (no sync; the trainer's path) or ``compute_flips_post_step`` (returns this step's flips as an int,
    one sync). Read the counts since the start with ``get_flip_counts`` & co., or this logging
    interval's with ``pop_step_counts``/``pop_step_metrics``; each read is one sync for all layers.

    ``predict_stall=True`` also keeps a float copy of each weight during the step and accumulates the
    predicted stall ``1 - mean(min(1, |dw| / ulp))`` over updated elements (``crossing_probability``)
    beside the measured one.
    """

    def __init__(self, predict_stall: bool = False) -> None:
        self.predict_stall = bool(predict_stall)
        self._layers: dict[str, _Layer] = {}

    # ---- per step -----------------------------------------------------------------------------------

    def snapshot_pre_step(
        self,
        name: str,
        weight: torch.Tensor,
        format: FormatLike,
        scale: ScaleLike,
        grad: torch.Tensor | None = None,
        codes: torch.Tensor | None = None,
    ) -> None:
        """Remember the codes of ``weight`` before the optimizer step (and which elements have a grad).

        With ``grad`` (here or at the post-step call), elements with ``|grad| > 1e-10`` count as
        updates (``update_counts[name]`` exists from the first step with a grad) and flips are split
        into updated and drift flips; without it, flips are counted but not split. A second snapshot
        before the post-step call replaces the first.

        ``codes``: the codes of ``weight`` in ``format`` at ``scale`` (round to nearest) if already
        computed, e.g. by the quantized forward (``QuantizedLinear.take_weight_codes()``): no encode
        here.
        """
        fmt = get_format(format)
        if not weight.is_floating_point():
            raise ValueError(f"layer {name!r}: weight must be a floating-point tensor, got {weight.dtype}")
        updated = None if grad is None else _updated_mask(name, weight, grad)
        if codes is None:
            codes = _encode(weight, fmt, scale)
        elif codes.shape != weight.shape or codes.dtype != _code_dtype(fmt):
            raise ValueError(
                f"layer {name!r}: codes {codes.dtype} {tuple(codes.shape)} are not {fmt.name} codes of the "
                f"weight {tuple(weight.shape)}"
            )
        else:
            codes = codes.detach()
        copy = weight.detach().float().clone() if self.predict_stall else None
        layer = self._layer(name, weight.device)  # created only once the inputs encoded cleanly
        layer.snapshot = _Snapshot(codes=codes, format=fmt, updated=updated, weight=copy)

    def record_post_step(
        self,
        name: str,
        weight: torch.Tensor,
        format: FormatLike,
        scale: ScaleLike,
        grad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Count this step's flips of ``name`` against its snapshot, as tensors; no host sync.

        ``scale`` should be the one given to the snapshot (the step's fixed scale). ``grad``, if given,
        decides which elements were updated (the gradient the step used, still in ``.grad`` after a
        closure step) instead of the snapshot's. Returns this step's flips as a 0-dim int64 tensor.
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
        updated = before.updated if grad is None else _updated_mask(name, weight, grad)
        step_counts = _step_counts(before.codes, _encode(weight, fmt, scale), fmt, updated)
        if updated is not None:
            layer.has_updates = True
            if before.weight is not None:
                dw = weight.detach().float() - before.weight
                p = crossing_probability(before.weight, dw, fmt, scale)
                layer.expected_flips += torch.where(updated, p, 0).sum(dtype=torch.float64)  # both rows
                layer.predicted_updates += step_counts[_UPDATES]
        layer.counts += step_counts  # both rows
        flips = step_counts[_FLIPS]
        layer.snapshot = None
        layer.steps += 1
        layer.interval_steps += 1
        layer.element_steps += weight.numel()
        layer.interval_element_steps += weight.numel()
        return flips

    def compute_flips_post_step(
        self,
        name: str,
        weight: torch.Tensor,
        format: FormatLike,
        scale: ScaleLike,
        grad: torch.Tensor | None = None,
    ) -> int:
        """Number of elements of ``name`` whose code changed since its snapshot (one host sync)."""
        return int(self.record_post_step(name, weight, format, scale, grad=grad).item())

    def invalidate(self, name: str | None = None) -> None:
        """Drop the pending snapshot of ``name`` (all layers if None): a step that gets no post-step call,
        e.g. a parameter the optimizer skipped. Counts are unchanged."""
        for key in [name] if name is not None else list(self._layers):
            if key in self._layers:
                self._layers[key].snapshot = None

    # ---- reading counts -------------------------------------------------------------------------------

    def _read(self, row: int) -> dict[str, list[float]]:
        """The count row of every layer, then its expected flips and predicted updates, one host sync per
        device (one in practice): ints, and the expected flips as a float."""
        by_device: dict[torch.device, list[str]] = {}
        for name, layer in self._layers.items():
            by_device.setdefault(layer.counts.device, []).append(name)
        values: dict[str, list[float]] = {}
        for names in by_device.values():
            counts = torch.stack([self._layers[name].counts[row] for name in names]).tolist()
            expected = torch.stack([self._layers[name].expected_flips[row] for name in names]).tolist()
            predicted = torch.stack([self._layers[name].predicted_updates[row] for name in names]).tolist()
            for name, c, e, u in zip(names, counts, expected, predicted, strict=True):
                values[name] = [*c, e, u]
        return {name: values[name] for name in self._layers}

    def get_flip_counts(self) -> dict[str, int]:
        """Cumulative flips per layer."""
        return {name: row[_FLIPS] for name, row in self._read(_TOTAL).items()}

    def get_drift_flip_counts(self) -> dict[str, int]:
        """Cumulative flips of elements with no gradient (optimizer state or weight decay) per layer."""
        return {name: row[_DRIFT_FLIPS] for name, row in self._read(_TOTAL).items()}

    def get_update_counts(self) -> dict[str, int]:
        """Cumulative attempted updates per layer (layers that had a grad at least once)."""
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

        ``{layer: {"flips", "updated_flips", "drift_flips", "updates", "grid_steps", "steps",
        "element_steps", "stall_ratio", "flip_rate", "update_ulps"}}``: counts summed over the
        interval's steps (ints), the stall ratio of those counts, the flip rate and grid steps per
        element and step (floats); with ``predict_stall`` also ``"expected_flips"`` and
        ``"predicted_stall_ratio"`` (``1 - expected_flips / updates``).
        """
        counts: dict[str, dict[str, float]] = {}
        for name, row in self._read(_INTERVAL).items():
            layer = self._layers[name]
            c: dict[str, float] = dict(zip(COUNT_NAMES, row[: len(COUNT_NAMES)], strict=True))
            c["steps"], c["element_steps"] = layer.interval_steps, layer.interval_element_steps
            c["stall_ratio"] = compute_stall_ratio(row[_UPDATED_FLIPS], row[_UPDATES])
            c["flip_rate"] = row[_FLIPS] / c["element_steps"] if c["element_steps"] else 0.0
            c["update_ulps"] = row[_GRID_STEPS] / c["element_steps"] if c["element_steps"] else 0.0
            if self.predict_stall:  # over the steps that predicted: the flag may have changed since
                c["expected_flips"], c["predicted_updates"] = row[-2], row[-1]
                c["predicted_stall_ratio"] = compute_stall_ratio(row[-2], row[-1])
            counts[name] = c
        return counts

    def pop_step_counts(self) -> dict[str, dict[str, float]]:
        """``step_counts()``, then start a new interval."""
        counts = self.step_counts()
        for layer in self._layers.values():
            layer.counts[_INTERVAL].zero_()
            layer.expected_flips[_INTERVAL].zero_()
            layer.predicted_updates[_INTERVAL].zero_()
            layer.interval_steps = layer.interval_element_steps = 0
        return counts

    @staticmethod
    def step_metrics(counts: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """The run folder's keys from ``step_counts()``: per layer and aggregated over layers.

        ``flips/{layer}``, ``updates/{layer}``, ``drift_flips/{layer}`` (summed over the interval's
        steps), ``stall_ratio/{layer}``, ``flip_rate/{layer}`` (flips per element and step),
        ``update_ulps/{layer}`` (grid steps per element and step), and ``flips/total``,
        ``updates/total``, ``drift_flips/total``, ``stall_ratio/mean`` (over layers with updates; 0.0
        if none), ``flip_rate/mean`` and ``update_ulps/mean`` (over layers measured). With predicted
        stall counts: ``predicted_stall_ratio/{layer}`` and ``predicted_stall_ratio/mean`` (over
        layers with updates).
        """
        metrics: dict[str, float] = {}
        stall_ratios, flip_rates, update_ulps, predicted = [], [], [], []
        for name, c in counts.items():
            for family in ("flips", "updates", "drift_flips", "stall_ratio", "flip_rate", "update_ulps"):
                metrics[metric_key(family, name)] = c[family]
            if "predicted_stall_ratio" in c:
                metrics[metric_key("predicted_stall_ratio", name)] = c["predicted_stall_ratio"]
                if c.get("predicted_updates", c["updates"]) > 0:
                    predicted.append(c["predicted_stall_ratio"])
            if c["updates"] > 0:
                stall_ratios.append(c["stall_ratio"])
            if c["element_steps"] > 0:
                flip_rates.append(c["flip_rate"])
                update_ulps.append(c["update_ulps"])
        for family in ("flips", "updates", "drift_flips"):
            metrics[aggregate_key(family, "total")] = sum(c[family] for c in counts.values())
        metrics[aggregate_key("stall_ratio", "mean")] = _mean(stall_ratios)
        metrics[aggregate_key("flip_rate", "mean")] = _mean(flip_rates)
        metrics[aggregate_key("update_ulps", "mean")] = _mean(update_ulps)
        if any("predicted_stall_ratio" in c for c in counts.values()):  # over layers with predicted updates
            metrics[aggregate_key("predicted_stall_ratio", "mean")] = _mean(predicted)
        return metrics

    def pop_step_metrics(self) -> dict[str, float]:
        """``step_metrics(pop_step_counts())``: what a trainer logs every N steps, one host sync."""
        return self.step_metrics(self.pop_step_counts())

    def state_bytes(self) -> int:
        """Bytes of tensor state held, all of it between a snapshot and its post-step call: codes (1 per
        element for <= 8-bit formats), the updated-mask (1) if a grad was given at the snapshot, and
        with ``predict_stall`` the float copy (4)."""
        return sum(layer.snapshot.nbytes() for layer in self._layers.values() if layer.snapshot is not None)

    # ---- lifecycle ----------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every layer: counts and snapshots."""
        self._layers.clear()

    def state_dict(self) -> dict[str, Any]:
        """Counts and step totals per layer as plain numbers (one sync), for checkpoints.

        Pending snapshots are not saved: a checkpoint is taken between steps.
        """
        totals, intervals = self._read(_TOTAL), self._read(_INTERVAL)
        n = len(COUNT_NAMES)
        return {
            "version": _STATE_VERSION,
            "layers": {
                name: {
                    "counts": totals[name][:n],
                    "interval_counts": intervals[name][:n],
                    "expected_flips": [totals[name][n], intervals[name][n]],
                    "predicted_updates": [totals[name][n + 1], intervals[name][n + 1]],
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
        """Replace all counts with those of ``state_dict()`` (version 1 states read with zero grid steps
        and expected flips; versions 1 and 2, which did not count predicted updates, with the updates
        of each row that has expected flips)."""
        version = state.get("version") if isinstance(state, Mapping) else None
        if version not in (1, 2, _STATE_VERSION) or "layers" not in state:
            raise ValueError(
                f"state: not a WeightFlipTracker state_dict (expected version 1 to {_STATE_VERSION} "
                "with 'layers')"
            )
        pad = [0] * (len(COUNT_NAMES) - 4) if version == 1 else []
        layers: dict[str, _Layer] = {}
        for name, saved in state["layers"].items():
            try:
                counts = [list(saved["counts"]) + pad, list(saved["interval_counts"]) + pad]
                expected = list(saved.get("expected_flips", [0.0, 0.0]))
                predicted = saved.get("predicted_updates") or [
                    row[_UPDATES] if e > 0 else 0 for row, e in zip(counts, expected, strict=True)
                ]
                layer = _Layer(
                    counts=torch.tensor(counts, dtype=torch.int64),
                    expected_flips=torch.tensor(expected, dtype=torch.float64),
                    predicted_updates=torch.tensor(predicted, dtype=torch.int64),
                    steps=int(saved["steps"]),
                    element_steps=int(saved["element_steps"]),
                    interval_steps=int(saved["interval_steps"]),
                    interval_element_steps=int(saved["interval_element_steps"]),
                    has_updates=bool(saved["has_updates"]),
                )
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"state: layer {name!r} is malformed ({error})") from None
            pairs = (layer.expected_flips.shape, layer.predicted_updates.shape)
            if layer.counts.shape != (2, len(COUNT_NAMES)) or pairs != ((2,), (2,)):
                raise ValueError(f"state: layer {name!r} counts must have {len(COUNT_NAMES)} columns")
            layers[name] = layer
        self._layers = layers

    def _layer(self, name: str, device: torch.device) -> _Layer:
        layer = self._layers.get(name)
        if layer is None:
            counts = torch.zeros(2, len(COUNT_NAMES), dtype=torch.int64, device=device)
            expected = torch.zeros(2, dtype=torch.float64, device=device)
            predicted = torch.zeros(2, dtype=torch.int64, device=device)
            layer = _Layer(counts=counts, expected_flips=expected, predicted_updates=predicted)
            self._layers[name] = layer
        elif layer.counts.device != device:  # loaded from a checkpoint on another device
            layer.counts = layer.counts.to(device)
            layer.expected_flips = layer.expected_flips.to(device)
            layer.predicted_updates = layer.predicted_updates.to(device)
        return layer


# ---- optimizer hooks ------------------------------------------------------------------------------

FormatAndScale = tuple[FormatLike, ScaleLike]
FormatSpec = Mapping[str, FormatLike | FormatAndScale] | Callable[[str, nn.Parameter], FormatAndScale | None]


def layer_name(parameter_name: str) -> str:
    """The tracker's layer name for a parameter: ``"h.0.attn.c_attn.weight"`` -> ``"h.0.attn.c_attn"``."""
    return parameter_name.removesuffix(".weight") if parameter_name.endswith(".weight") else parameter_name


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer whose step hooks fire: wrappers that hold it as ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``) are unwrapped, however deep."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer: expected a torch.optim.Optimizer or a wrapper holding one as .optimizer, "
            f"got {type(optimizer).__name__}"
        )
    return optimizer


class FlipTrackerHooks:
    """A tracker on an optimizer's step hooks (see ``attach_flip_tracker``); ``remove()`` detaches it.

    The pre-step hook snapshots codes (``codes(parameter)`` when given and not None: codes already
    computed at the resolved format and scale, e.g. ``QuantizedLinear.take_weight_codes``, so no second
    encode); the post-step hook counts flips and takes the updated elements
    from the gradient in ``.grad`` *after* the step: the one the step used, also when a closure
    computes it inside ``step`` (LBFGS, Lightning's automatic optimization). This assumes the loop
    calls ``zero_grad`` after ``step``, not between the closure and the end of the step.
    """

    def __init__(
        self,
        tracker: WeightFlipTracker,
        optimizer: torch.optim.Optimizer,
        parameters: list[tuple[str, str, nn.Parameter]],
        resolve: Callable[[str, nn.Parameter], FormatAndScale | None],
        codes: Callable[[nn.Parameter], torch.Tensor | None] | None = None,
    ) -> None:
        self.tracker = tracker
        self._codes = codes  # the parameter's codes at the resolved format and scale, if already computed
        self.layers = {layer: name for layer, name, _ in parameters}  # layer name -> parameter name
        self._parameters = parameters
        self._resolve = resolve
        self._in_step: list[tuple[str, nn.Parameter, FormatLike, ScaleLike]] = []
        optimizer = torch_optimizer(optimizer)
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        closure = kwargs.get("closure", args[0] if args else None)
        self._in_step = []
        for layer, name, parameter in self._parameters:
            if parameter.grad is None and closure is None:  # the optimizer will not touch it this step
                continue
            spec = self._resolve(name, parameter)
            if spec is None:
                continue
            fmt, scale = spec
            codes = self._codes(parameter) if self._codes is not None else None
            self.tracker.snapshot_pre_step(layer, parameter, fmt, scale, codes=codes)
            self._in_step.append((layer, parameter, fmt, scale))

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for layer, parameter, fmt, scale in self._in_step:
            if parameter.grad is None:  # no gradient even after the closure: the optimizer skipped it
                self.tracker.invalidate(layer)
            else:
                self.tracker.record_post_step(layer, parameter, fmt, scale, grad=parameter.grad)
        self._in_step = []

    def remove(self) -> None:
        """Detach the hooks (the tracker and its counts stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def attach_flip_tracker(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Any,
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

    ``optimizer`` is a torch optimizer or a wrapper holding one as ``.optimizer`` (accelerate,
    Lightning). Layers are named after the parameter without its ``.weight`` suffix. A parameter with
    no gradient after a step is skipped that step. Pass ``tracker=WeightFlipTracker(predict_stall=True)``
    for the predicted stall. Returns a ``FlipTrackerHooks``: ``.tracker`` holds the counts,
    ``.remove()`` detaches.

    Example::

        hooks = attach_flip_tracker(model, optimizer, default_format="E5M2")
        train(model, optimizer)                        # any loop that calls optimizer.step()
        hooks.tracker.get_stall_ratios()               # {'h.0.attn.c_attn': 0.93, ...}
    """
    optimizer = torch_optimizer(optimizer)
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
