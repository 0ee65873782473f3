"""Why a quantized run falls short, from measurements and their controls, per layer, at the steps where
the evidence was recorded.

The checks run in this order; the first that holds is the finding (the others that hold are listed in
its evidence):

1. **divergence**: a non-finite train loss (or a ``nan_stop``), or a train loss that explodes:
   ``loss > first_loss + DIVERGENCE_MARGIN`` (worse than at init, about ln(vocab)) or
   ``loss > running_min + DIVERGENCE_RISE`` (learning undone), on MIN_CONSECUTIVE_RECORDS logged
   records in a row (or until the last record).
2. **forward precision**: the forward-precision cost of the current weights,
   ``cost = val_loss - val_loss_fp32_forward`` (the same weights evaluated with the quantizers bypassed,
   on the same windows), is material on MIN_CONSECUTIVE_EVALS evals in a row (or until the last eval):
   ``cost >= FORWARD_COST_THRESHOLD`` nats, or, given an fp32 baseline run,
   ``cost >= FORWARD_GAP_SHARE * (val_loss - baseline val_loss)`` at that step and
   ``cost >= FORWARD_COST_FLOOR``. The worst layer is the one with the largest weight or activation
   relative RMS error (``quant/rel_error/{layer}/{kind}``) on the last quant-stats record at or before
   the onset; its overflow and underflow fractions are quoted beside it.
3. **gradient fidelity**: on quant-stats records (``quant/*/{layer}/grad``), the worst layer flushes or
   saturates at least GRADIENT_LOSS_THRESHOLD of its output-gradient elements, or its gradient relative
   RMS error is at least GRADIENT_REL_ERROR_THRESHOLD, on MIN_CONSECUTIVE_RECORDS records in a row.
4. **optimizer update**: only where weights are stored in the format (``optimizer.weight_storage`` set):
   the worst layer's stall ratio is above STALL_RATIO_THRESHOLD after the LR warmup, while the lr is at
   least LR_FRACTION_THRESHOLD of its peak, on MIN_CONSECUTIVE_RECORDS flip records in a row: the
   updates are lost. With an fp32 master copy a stall is grid coarseness (the master accumulates what
   the grid does not show), never a failure; the evidence quotes it as such.
5. **none observed**: none of the above; the evidence names every check that had no data to run on
   (a missing measurement is never read as healthy).

Example::

    >>> finding = classify_failure(load_run("runs/e7m0_adamw"))       # doctest: +SKIP
    >>> finding.to_dict()                                              # doctest: +SKIP
    {'mode': 'forward precision', 'step': 10, 'layers': ['transformer.h.1.attn.c_proj', ...], ...}
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from altgrad.analysis.matrix import STORAGE_KEY, keeps_master_copy
from altgrad.analysis.runs import Run, lookup

DIVERGENCE = "divergence"
FORWARD = "forward precision"
GRADIENT = "gradient fidelity"
OPTIMIZER = "optimizer update"
NONE = "none observed"
MODES = (DIVERGENCE, FORWARD, GRADIENT, OPTIMIZER)
"""The failure modes, in the order they are checked (NONE when none holds)."""

DIVERGENCE_MARGIN = 1.0
"""Nats above the first logged train loss (about ln(vocab) at init) that count as an explosion."""
DIVERGENCE_RISE = 2.0
"""Nats above the running minimum of the train loss that count as an explosion (learning undone)."""
FORWARD_COST_THRESHOLD = 0.02
"""Nats of val loss that the quantized forward costs the current weights, without a baseline."""
FORWARD_GAP_SHARE = 0.5
"""With an fp32 baseline: the forward cost is material when it is at least this share of the gap."""
FORWARD_COST_FLOOR = 0.005
"""With an fp32 baseline: a forward cost below this (nats) is never material (eval noise, ties)."""
GRADIENT_LOSS_THRESHOLD = 0.5
"""A layer that flushes to zero (or saturates) at least half its gradient elements fails."""
GRADIENT_REL_ERROR_THRESHOLD = 0.5
"""A layer whose gradient relative RMS error ||Q(g) - g|| / ||g|| is at least this fails."""
STALL_RATIO_THRESHOLD = 0.9
"""With weights stored in the format: more than 90% of the attempted updates kept their code."""
LR_FRACTION_THRESHOLD = 0.5
"""The stall check skips steps whose logged ``lr`` is below this fraction of the run's peak lr."""
MIN_CONSECUTIVE_RECORDS = 3
"""A per-step criterion must hold on this many recorded steps in a row (or until the last record)."""
MIN_CONSECUTIVE_EVALS = 2
"""The forward-cost criterion must hold on this many evals in a row (or until the last eval)."""
MAX_LAYERS_LISTED = 3
WARMUP_KEY = "train.warmup_steps"
FORWARD_KINDS = ("weight", "activation")


def thresholds_text() -> str:
    """The criteria in one paragraph, for reports."""
    return (
        f"Checked in order, the first that holds is the finding. '{DIVERGENCE}': a non-finite loss, or a "
        f"train loss more than {DIVERGENCE_MARGIN:g} nat above its first value or {DIVERGENCE_RISE:g} nats "
        f"above its running minimum. '{FORWARD}': the forward cost val_loss - val_loss_fp32_forward (same "
        f"weights, quantizers bypassed) is >= {FORWARD_COST_THRESHOLD:g} nats, or, with an fp32 baseline, "
        f">= {FORWARD_GAP_SHARE:g} of the gap to it (and >= {FORWARD_COST_FLOOR:g}); the worst layer is the "
        f"one with the largest weight/activation relative RMS error. '{GRADIENT}': a layer flushes or "
        f"saturates >= {GRADIENT_LOSS_THRESHOLD:g} of its gradient elements, or its gradient relative RMS "
        f"error is >= {GRADIENT_REL_ERROR_THRESHOLD:g}. '{OPTIMIZER}': only with weights stored in the "
        f"format (no fp32 master), a layer's stall ratio > {STALL_RATIO_THRESHOLD:g} after the warmup while "
        f"the lr is >= {LR_FRACTION_THRESHOLD:g} of its peak; with a master copy the stall ratio is grid "
        f"coarseness, not a failure. Per-step criteria must hold on {MIN_CONSECUTIVE_RECORDS} recorded "
        f"steps in a row, the forward cost on {MIN_CONSECUTIVE_EVALS} evals (or until the last record); "
        "only steps where the evidence was recorded count, and a check without data is named as such."
    )


@dataclass
class FailureFinding:
    """The failure point of one run: mode, the step it shows up, the worst layers first, and why."""

    mode: str
    step: int | None
    layers: list[str] = field(default_factory=list)
    evidence: str = ""

    def to_dict(self) -> dict[str, Any]:
        """``{"mode", "step", "layers", "evidence"}``, strict-JSON ready."""
        return asdict(self)


@dataclass
class _Check:
    """One mode's outcome: the onset step (None: did not hold), the worst layers, the evidence text,
    and whether the data it needs was recorded at all."""

    step: int | None
    layers: list[str]
    evidence: str
    recorded: bool = True


# ---- reading the records -----------------------------------------------------------------------------


def _train_loss(run: Run) -> pd.Series:
    """The train loss by step with non-finite values kept (every logged record carries it, so a missing
    value is a non-finite loss; ``Run.series`` drops those)."""
    if "train_loss" not in run.metrics.columns:
        return pd.Series(dtype=float)
    values = pd.to_numeric(run.metrics["train_loss"], errors="coerce").fillna(math.nan)
    return pd.Series(values.to_numpy(dtype=float), index=run.metrics["step"].to_numpy())


def _per_layer(run: Run, stat: str, kind: str) -> pd.DataFrame:
    """``quant/{stat}/{layer}/{kind}`` as a step x layer frame, only the steps where it was recorded."""
    prefix, suffix = f"quant/{stat}/", f"/{kind}"
    columns = {
        column[len(prefix) : -len(suffix)]: column
        for column in run.columns(prefix)
        if column.endswith(suffix) and column.count("/") >= 3
    }
    frame = pd.DataFrame({layer: run.series(column) for layer, column in columns.items()})
    return frame.dropna(how="all").sort_index()


def _onset(flags: pd.Series, needed: int) -> int | None:
    """First step from which ``flags`` is True on ``needed`` records in a row (or to the last record)."""
    values, steps = flags.to_numpy(dtype=bool), flags.index.to_numpy()
    start = None
    for i, flag in enumerate(values):
        if not flag:
            start = None
            continue
        start = i if start is None else start
        if i - start + 1 >= needed or i == len(values) - 1:
            return int(steps[start])
    return None


def _worst(frame: pd.DataFrame, step: int) -> list[str]:
    """Layers by their value at ``step``, largest first."""
    row = frame.loc[step].dropna().sort_values(ascending=False, kind="stable")
    return [str(layer) for layer in row.index[:MAX_LAYERS_LISTED]]


# ---- the checks --------------------------------------------------------------------------------------


def _divergence(run: Run) -> _Check:
    loss = _train_loss(run)
    stops = run.events_of("nan_stop").dropna(subset=["step"])
    stop_step = int(stops["step"].iloc[0]) if len(stops) else None
    nonfinite = [int(s) for s in loss.index[~np.isfinite(loss.to_numpy())]]
    onsets: list[tuple[int, str]] = []
    if nonfinite:
        onsets.append((min(nonfinite), f"non-finite loss at step {min(nonfinite)}"))
    if stop_step is not None:
        onsets.append((stop_step, f"run stopped on non-finite loss or weights at step {stop_step}"))
    finite = loss[np.isfinite(loss.to_numpy())]
    if len(finite):
        first, running_min = float(finite.iloc[0]), finite.cummin()
        exploded = (finite > first + DIVERGENCE_MARGIN) | (finite > running_min + DIVERGENCE_RISE)
        step = _onset(exploded, MIN_CONSECUTIVE_RECORDS)
        if step is not None:
            onsets.append(
                (
                    step,
                    f"train loss {finite.loc[step]:.3g} at step {step} (first {first:.3g}, "
                    f"running minimum {running_min.loc[step]:.3g})",
                )
            )
    if not onsets:
        return _Check(None, [], "", recorded=len(loss) > 0)
    step, text = min(onsets)
    layers = _nan_stop_layers(run) if stop_step is not None else []
    return _Check(step, layers, text)


def _forward(run: Run, baseline: Run | None) -> _Check:
    val, control = run.series("val_loss"), run.series("val_loss_fp32_forward")
    cost = (val - control).dropna()
    if cost.empty:
        return _Check(None, [], "", recorded=False)
    material = cost >= FORWARD_COST_THRESHOLD
    gap = None
    if baseline is not None:
        gap = (val - baseline.series("val_loss")).reindex(cost.index)
        material |= (cost >= FORWARD_GAP_SHARE * gap) & (cost >= FORWARD_COST_FLOOR) & gap.notna()
    step = _onset(material, MIN_CONSECUTIVE_EVALS)
    if step is None:
        at = int(cost.idxmax())
        _, support = _forward_support(run, at)  # the worst layer's rounding, quoted even when it costs little
        return _Check(None, [], f"largest forward cost {cost.loc[at]:.3g} nats at step {at}{support}")
    text = f"forward cost val_loss - val_loss_fp32_forward = {cost.loc[step]:.3g} nats at step {step}"
    if gap is not None and pd.notna(gap.loc[step]):
        text += f" (gap to fp32 {gap.loc[step]:.3g})"
    layers, support = _forward_support(run, step)
    return _Check(step, layers, text + support)


def _forward_support(run: Run, step: int) -> tuple[list[str], str]:
    """The layers with the largest weight/activation rel_error at the last quant record <= ``step``."""
    frames = {kind: _per_layer(run, "rel_error", kind) for kind in FORWARD_KINDS}
    frames = {kind: frame for kind, frame in frames.items() if not frame.empty}
    if not frames:
        return [], "; per-layer rounding error not recorded"
    combined = pd.concat(frames.values(), axis=1).T.groupby(level=0).max().T  # max over kinds per layer
    earlier = combined.index[combined.index <= step]
    at = int(earlier[-1] if len(earlier) else combined.index[0])
    layers = _worst(combined, at)
    worst = layers[0]
    parts = []
    for kind, frame in frames.items():
        if worst in frame.columns and pd.notna(frame.loc[at, worst]):
            under = _per_layer(run, "underflow_frac", kind)
            over = _per_layer(run, "overflow_frac", kind)
            figures = f"{kind} rel_error {frame.loc[at, worst]:.3g}"
            if worst in under.columns and at in under.index:
                figures += f", underflow {under.loc[at, worst]:.3g}"
            if worst in over.columns and at in over.index:
                figures += f", overflow {over.loc[at, worst]:.3g}"
            parts.append(figures)
    return layers, f"; worst layer {worst} at step {at}: " + "; ".join(parts)


def _gradient(run: Run) -> _Check:
    lost = _per_layer(run, "underflow_frac", "grad").add(
        _per_layer(run, "overflow_frac", "grad"), fill_value=0
    )
    error = _per_layer(run, "rel_error", "grad")
    if lost.empty and error.empty:
        return _Check(None, [], "", recorded=False)
    index = lost.index.union(error.index)
    lost, error = lost.reindex(index), error.reindex(index)
    # each layer's signal in units of its threshold (the larger of the two): >= 1 fails, largest is worst
    score = pd.concat([lost / GRADIENT_LOSS_THRESHOLD, error / GRADIENT_REL_ERROR_THRESHOLD])
    score = score.groupby(level=0).max()
    step = _onset(score.max(axis=1) >= 1.0, MIN_CONSECUTIVE_RECORDS)
    worst_lost = float(lost.max().max()) if lost.notna().any().any() else math.nan
    if step is None:
        return _Check(None, [], f"largest gradient flush/saturation fraction {worst_lost:.3g}")
    layers = _worst(score, step)
    worst = layers[0]
    parts = []
    if worst in lost.columns and pd.notna(lost.loc[step, worst]):
        parts.append(f"{lost.loc[step, worst]:.3g} of its gradient elements flushed to zero or saturated")
    if worst in error.columns and pd.notna(error.loc[step, worst]):
        parts.append(f"gradient rel_error {error.loc[step, worst]:.3g}")
    return _Check(step, layers, f"worst layer {worst} at step {step}: " + ", ".join(parts))


def _stalls(run: Run) -> pd.DataFrame:
    """Per-layer stall ratios at the flip records after the warmup where the lr is near its peak."""
    prefix = "stall_ratio/"
    columns = [c for c in run.columns(prefix) if c[len(prefix) :] not in ("mean", "min", "max")]
    frame = pd.DataFrame({c[len(prefix) :]: run.series(c) for c in columns}).dropna(how="all").sort_index()
    frame = frame[frame.index > (lookup(run.config, WARMUP_KEY) or 0)]
    lr = run.series("lr")
    if not lr.empty:
        frame = frame[frame.index.isin(lr[lr >= LR_FRACTION_THRESHOLD * lr.max()].index)]
    return frame


def _optimizer(run: Run) -> _Check:
    stalls = _stalls(run)
    if stalls.empty:
        return _Check(None, [], "", recorded=False)
    storage = lookup(run.config, STORAGE_KEY)
    mean = float(stalls.mean(axis=1).mean())
    # not the summary's mean_stall_ratio (the run's cumulative ratio per layer): the steps judged here only
    what = f"stall ratio {mean:.3g} (mean over layers and flip records after warmup at >= half the peak lr)"
    if keeps_master_copy(storage):
        return _Check(None, [], f"{what} with an fp32 master copy: grid coarseness")
    step = _onset(stalls.max(axis=1) > STALL_RATIO_THRESHOLD, MIN_CONSECUTIVE_RECORDS)
    if step is None:
        return _Check(None, [], f"{what} with weights stored in {storage}")
    layers = _worst(stalls, step)
    text = (
        f"weights stored in {storage} (no master copy): worst layer {layers[0]} stalls "
        f"{stalls.loc[step, layers[0]]:.3g} of its attempted updates at step {step} (lost updates)"
    )
    return _Check(step, layers, text)


def classify_failure(run: Run, baseline: Run | None = None) -> FailureFinding:
    """The failure finding of ``run`` (see the module docstring); ``baseline`` is an fp32 run with the
    same data order, whose val loss makes the forward-cost threshold relative to the gap."""
    checks = {
        DIVERGENCE: _divergence(run),
        FORWARD: _forward(run, baseline),
        GRADIENT: _gradient(run),
        OPTIMIZER: _optimizer(run),
    }
    held = [mode for mode in MODES if checks[mode].step is not None]
    unassessed = [mode for mode in MODES if not checks[mode].recorded]
    missing = f"not assessed (no data recorded): {', '.join(unassessed)}" if unassessed else ""
    if not held:
        notes = [checks[mode].evidence for mode in MODES if checks[mode].evidence]
        evidence = "; ".join(["no criterion held", *notes, *([missing] if missing else [])])
        return FailureFinding(NONE, None, [], evidence)
    mode = held[0]
    check = checks[mode]
    others = [f"{other} from step {checks[other].step}" for other in held[1:]]
    evidence = check.evidence + (f"; also {', '.join(others)}" if others else "")
    return FailureFinding(mode, check.step, check.layers, evidence)


def write_analysis(run: Run, baseline: Run | None = None) -> Path:
    """Write ``analysis.json`` (``{"failure": finding.to_dict()}``, strict JSON) into the run folder."""
    finding = classify_failure(run, baseline)
    path = run.path / "analysis.json"
    path.write_text(json.dumps({"failure": finding.to_dict()}, indent=2, allow_nan=False) + "\n")
    return path


def _nan_stop_layers(run: Run) -> list[str]:
    events = run.events_of("nan_stop")
    if not len(events) or "layers" not in events.columns:
        return []
    layers = events["layers"].iloc[0]
    return [str(layer) for layer in layers][:MAX_LAYERS_LISTED] if isinstance(layers, list) else []
