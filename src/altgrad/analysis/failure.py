"""Where a quantized run fails, from the evidence it logged: forward precision, gradient fidelity,
or the optimizer update.

Per logged step three signals are read:

* forward  = the largest overflow or underflow fraction of weights and activations,
* gradient = the larger of the gradient overflow and underflow fractions,
* stall    = the mean stall ratio over layers (1 - flips / updates), after the LR warmup and while the
  learning rate is at least LR_FRACTION_THRESHOLD of its peak (a decaying schedule makes updates
  smaller than a grid step by design: a stall in that tail is expected, not a failure).

A mode holds at a step when

* forward precision: forward >= QUANT_FRACTION_THRESHOLD and forward >= gradient,
* gradient fidelity: gradient >= QUANT_FRACTION_THRESHOLD and gradient > forward,
* optimizer update:  stall > STALL_RATIO_THRESHOLD while gradient < QUANT_FRACTION_THRESHOLD (healthy
  gradients) and forward precision does not hold,

and it "shows up" at the first step from which it holds for MIN_CONSECUTIVE_RECORDS records in a row
(or until the last record). The failure point is the earliest mode to show up; with none, the run's
NaN stop / collapse step is reported under "none observed".

Example::

    >>> finding = classify_failure(load_run("runs/e5m2_adamw"))       # doctest: +SKIP
    >>> finding.mode, finding.step, finding.layers                     # doctest: +SKIP
    ('gradient fidelity', 120, ['transformer.h.3.mlp.c_proj'])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from altgrad.analysis.runs import Run, lookup
from altgrad.analysis.summaries import aggregate_series, layer_columns, summarize_run

QUANT_FRACTION_THRESHOLD = 0.05
"""An overflow or underflow fraction this large (5% of elements saturated or flushed to zero) is a failure."""
STALL_RATIO_THRESHOLD = 0.9
"""A mean stall ratio above this means more than 90% of the updated weights kept their code."""
MIN_CONSECUTIVE_RECORDS = 3
"""A criterion must hold on this many logged records in a row (or until the run's last record)."""
MAX_LAYERS_LISTED = 3
WARMUP_KEY = "train.warmup_steps"
"""The stall criterion skips the LR warmup: tiny early updates stall by design, not by failure."""
LR_FRACTION_THRESHOLD = 0.5
"""The stall criterion skips steps whose logged ``lr`` is below this fraction of the run's peak lr."""

FORWARD = "forward precision"
GRADIENT = "gradient fidelity"
OPTIMIZER = "optimizer update"
NONE = "none observed"
MODES = (FORWARD, GRADIENT, OPTIMIZER)
FORWARD_KINDS = ("weight", "activation")
SIDES = ("overflow", "underflow")


def thresholds_text() -> str:
    """The criteria in one paragraph, for reports."""
    return (
        f"Thresholds: an overflow or underflow fraction >= {QUANT_FRACTION_THRESHOLD:g} is a failure; "
        f"'{FORWARD}' when the largest weight/activation fraction crosses it and is at least the "
        f"gradient fraction; '{GRADIENT}' when the gradient under/overflow fraction crosses it and exceeds "
        f"the forward one; '{OPTIMIZER}' when the mean stall ratio is > {STALL_RATIO_THRESHOLD:g} after "
        f"the LR warmup, while the lr is >= {LR_FRACTION_THRESHOLD:g} of its peak, and while gradient "
        f"fractions stay below {QUANT_FRACTION_THRESHOLD:g}. A criterion "
        f"counts from the first step where it holds on {MIN_CONSECUTIVE_RECORDS} consecutive logged records "
        "(or until the last record); the earliest one is the failure point. Without any, the "
        "NaN-stop/collapse step (if any) is given."
    )


@dataclass
class FailureFinding:
    """The failure point of one run: mode, the step it shows up, the layers that go first, and why."""

    mode: str
    step: int | None
    layers: list[str] = field(default_factory=list)
    evidence: str = ""


def _frame(run: Run, columns: list[str]) -> pd.DataFrame:
    present = [column for column in columns if column in run.metrics.columns]
    frame = run.metrics.set_index("step")[present].apply(pd.to_numeric, errors="coerce")
    return frame.reindex(columns=columns)


def _onset(flags: pd.Series) -> int | None:
    """First step from which ``flags`` is True on MIN_CONSECUTIVE_RECORDS records in a row (or to the end)."""
    values = flags.to_numpy(dtype=bool)
    steps = flags.index.to_numpy()
    start = None
    for i, flag in enumerate(values):
        if not flag:
            start = None
            continue
        start = i if start is None else start
        if i - start + 1 >= MIN_CONSECUTIVE_RECORDS or i == len(values) - 1:
            return int(steps[start])
    return None


def _stall_counts(run: Run, stall: pd.Series) -> pd.Series:
    """``stall`` restricted to the steps where a stall can be a failure: after the LR warmup, and while
    the logged lr is at least LR_FRACTION_THRESHOLD of its peak (every step when lr was not logged)."""
    stall = stall[stall.index > (lookup(run.config, WARMUP_KEY) or 0)]
    lr = run.series("lr")
    if lr.empty:
        return stall
    high_lr = lr[lr >= LR_FRACTION_THRESHOLD * lr.max()].index
    return stall[stall.index.isin(high_lr)]


def _layer_onsets(run: Run, mode: str) -> list[str]:
    """The layers whose own signal crosses the threshold for ``mode``, earliest first."""
    per_layer: dict[str, pd.Series] = {}
    if mode == OPTIMIZER:
        for layer, column in layer_columns(run, "stall_ratio").items():
            per_layer[layer] = _stall_counts(run, run.series(column)) > STALL_RATIO_THRESHOLD
    else:
        kinds = FORWARD_KINDS if mode == FORWARD else ("grad",)
        signals: dict[str, list[str]] = {}
        for side in SIDES:
            prefix = f"quant/{side}_frac/"
            for column in run.columns(prefix):
                layer, _, kind = column[len(prefix) :].rpartition("/")
                if layer and kind in kinds:
                    signals.setdefault(layer, []).append(column)
        for layer, columns in signals.items():
            per_layer[layer] = _frame(run, columns).max(axis=1).dropna() >= QUANT_FRACTION_THRESHOLD
    onsets = {layer: _onset(flags) for layer, flags in per_layer.items() if len(flags)}
    ranked = sorted((step, layer) for layer, step in onsets.items() if step is not None)
    return [layer for _, layer in ranked[:MAX_LAYERS_LISTED]]


def failure_signals(run: Run) -> pd.DataFrame:
    """Per step: ``forward``, ``gradient`` and ``stall`` (after the LR warmup) signals, and the name of the
    largest forward fraction."""
    forward_columns = [f"quant/{side}_frac/{kind}" for kind in FORWARD_KINDS for side in SIDES]
    grad_columns = [f"quant/{side}_frac/grad" for side in SIDES]
    forward = _frame(run, forward_columns)
    signals = pd.DataFrame(index=forward.index)
    signals["forward"] = forward.max(axis=1)
    signals["forward_source"] = pd.Series(None, index=forward.index, dtype=object)
    known = forward.notna().any(axis=1)
    if known.any():
        signals.loc[known, "forward_source"] = forward[known].idxmax(axis=1)
    signals["gradient"] = _frame(run, grad_columns).max(axis=1)
    stall = aggregate_series(run, "stall_ratio", "mean")
    signals["stall"] = _stall_counts(run, stall).reindex(signals.index)
    return signals


def _flags(signals: pd.DataFrame) -> dict[str, pd.Series]:
    forward, gradient, stall = signals["forward"], signals["gradient"], signals["stall"]
    forward_flag = (forward >= QUANT_FRACTION_THRESHOLD) & ((forward >= gradient) | gradient.isna())
    gradient_flag = (gradient >= QUANT_FRACTION_THRESHOLD) & ((gradient > forward) | forward.isna())
    healthy_gradient = (gradient < QUANT_FRACTION_THRESHOLD) | gradient.isna()
    optimizer_flag = (stall > STALL_RATIO_THRESHOLD) & healthy_gradient & ~forward_flag
    return {
        FORWARD: forward_flag[forward.notna()],
        GRADIENT: gradient_flag[gradient.notna()],
        OPTIMIZER: optimizer_flag[stall.notna()],
    }


def _evidence(mode: str, step: int, signals: pd.DataFrame) -> str:
    row = signals.loc[step]
    if mode == FORWARD:
        grad = "not recorded" if pd.isna(row["gradient"]) else f"{row['gradient']:.3g}"
        side, kind = row["forward_source"].removeprefix("quant/").split("_frac/")
        return f"{kind} {side} fraction = {row['forward']:.3g} at step {step} (gradient fraction {grad})"
    if mode == GRADIENT:
        forward = "not recorded" if pd.isna(row["forward"]) else f"{row['forward']:.3g}"
        return f"gradient under/overflow = {row['gradient']:.3g} at step {step} (forward fraction {forward})"
    grad = "not recorded" if pd.isna(row["gradient"]) else f"{row['gradient']:.3g}"
    return f"mean stall ratio = {row['stall']:.3g} at step {step} (gradient fraction {grad})"


def classify_failure(run: Run) -> FailureFinding:
    """The evidence-based failure point of a run (see the module docstring for the criteria)."""
    signals = failure_signals(run)
    onsets = {mode: _onset(flags) for mode, flags in _flags(signals).items()}
    observed = sorted((step, MODES.index(mode), mode) for mode, step in onsets.items() if step is not None)
    figures = summarize_run(run)
    collapse = figures["collapse_step"]
    collapse_text = (
        "" if collapse is None else f"; collapsed at step {collapse} ({figures['collapse_reason']})"
    )
    if not observed:
        if collapse is None:
            return FailureFinding(NONE, None, [], "no criterion held")
        layers = _nan_stop_layers(run)
        return FailureFinding(NONE, collapse, layers, f"no criterion held before the collapse{collapse_text}")
    step, _, mode = observed[0]
    evidence = _evidence(mode, step, signals)
    others = [f"{other} from step {other_step}" for other_step, _, other in observed[1:]]
    if others:
        evidence += "; also " + ", ".join(others)
    return FailureFinding(mode, step, _layer_onsets(run, mode), evidence + collapse_text)


def _nan_stop_layers(run: Run) -> list[str]:
    events = run.events_of("nan_stop")
    if not len(events) or "layers" not in events.columns:
        return []
    layers = events["layers"].iloc[0]
    return [str(layer) for layer in layers][:MAX_LAYERS_LISTED] if isinstance(layers, list) else []
