"""One run record: the metric keys training writes, the summary fields, and the one summary computation.

Producers (the trainer, the diagnostic components) build keys with these functions and consumers
(interventions, analysis, reports) read them with the same functions, so a key is spelled in one
place. The key grammar of docs/run_folder.md::

    {family}/{layer}               per layer or parameter       metric_key("stall_ratio", "h.0.attn")
    {family}/{how}                 aggregate over layers        aggregate_key("stall_ratio", "mean")
    quant/{stat}/{layer}/{kind}    quantization statistics      quant_key("rel_error", "weight", "h.0.mlp")
    quant/{stat}/{kind}            their mean over layers       quant_key("rel_error", "weight")

``summarize(metrics, events)`` computes the run's headline figures from the records of metrics.jsonl
and events.jsonl. The trainer calls it at the end of a run (into summary.json) and the analysis calls
it on a run folder without a usable summary.json: both agree by construction. Definitions and units
are in ``SUMMARY_FIELDS``.

Example::

    >>> metrics = [{"step": 1, "train_loss": 3.0, "tokens_per_s": 900.0},
    ...            {"step": 2, "train_loss": 2.5, "tokens_per_s": 1100.0, "val_loss": 2.6}]
    >>> figures = summarize(metrics, events=[])
    >>> figures["final_train_loss"], figures["best_val_loss"], figures["tokens_per_s"]
    (2.5, 2.6, 1000.0)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

AGGREGATE_NAMES = ("mean", "min", "max", "total")
"""Suffixes of aggregate keys (``stall_ratio/mean``), as opposed to per-layer keys."""

# ---- metric keys -----------------------------------------------------------------------------------


def metric_key(family: str, name: str) -> str:
    """``{family}/{name}``: one layer's (or parameter's) value, e.g. ``flips/h.0.attn.c_attn``."""
    return f"{family}/{name}"


def aggregate_key(family: str, how: str) -> str:
    """``{family}/{how}`` with ``how`` one of ``AGGREGATE_NAMES``, e.g. ``stall_ratio/mean``."""
    if how not in AGGREGATE_NAMES:
        raise ValueError(f"how: {how!r} is not one of {AGGREGATE_NAMES}")
    return f"{family}/{how}"


def quant_key(stat: str, kind: str, layer: str | None = None) -> str:
    """``quant/{stat}/{layer}/{kind}`` for one layer, ``quant/{stat}/{kind}`` for the mean over layers."""
    return f"quant/{stat}/{kind}" if layer is None else f"quant/{stat}/{layer}/{kind}"


def layer_values(record: Mapping[str, Any], family: str) -> dict[str, Any]:
    """The per-layer values of ``family`` in one record: ``{layer: value}`` (aggregates left out)."""
    prefix = f"{family}/"
    return {
        key[len(prefix) :]: value
        for key, value in record.items()
        if key.startswith(prefix) and key[len(prefix) :] not in AGGREGATE_NAMES
    }


# ---- the summary -------------------------------------------------------------------------------------

SUMMARY_FIELDS: dict[str, str] = {
    "final_train_loss": "nats; train_loss of the last logged step (None when non-finite)",
    "best_train_loss": "nats; lowest finite train_loss logged",
    "final_val_loss": "nats; the last val_loss logged",
    "best_val_loss": "nats; the lowest val_loss logged",
    "final_val_ppl": "exp(min(final_val_loss, 700)), as val_ppl is logged",
    "tokens_per_s": "tokens per second of wall time; median over the logged windows (each window: the "
    "tokens of the steps since the previous logged step over their wall time, evaluations included), "
    "so an evaluation or checkpoint pause and the first steps' warm-up do not move it",
    "total_flips": "codes changed, summed over every step of the run; None unless flips were logged at "
    "every step from step 1 (a sum over sampled steps is not the run's total)",
    "mean_stall_ratio": "mean over layers with updates of the layer's pooled stall ratio over the run: "
    "its logged stall_ratio weighted by updates, i.e. 1 - sum(updated flips) / sum(updates)",
    "min_stable_rank": "lowest stable_rank/min logged (per-parameter stable_rank if no aggregate)",
    "min_effective_rank": "lowest effective_rank/min logged (per-parameter effective_rank if no aggregate)",
    "first_rank_warning_step": "step of the first rank_warning event, None if none",
    "collapse_step": "step of the nan_stop event, None if the run did not stop on a non-finite value",
    "collapse_reason": "the nan_stop event's message (what was non-finite, in which parameters)",
    "format_shifts": "the format_shift events, in order",
}
"""Each figure ``summarize`` returns, with its unit and definition (docs/run_folder.md quotes these)."""


def _number(value: Any) -> float | None:
    """A finite-or-infinite float, or None for a missing value (None or NaN, as pandas reads one)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) else float(value)


def _values(metrics: list[Mapping[str, Any]], key: str) -> list[float]:
    return [v for r in metrics if (v := _number(r.get(key))) is not None]


def _lowest(metrics: list[Mapping[str, Any]], family: str) -> float | None:
    """Lowest ``{family}/min`` logged, else lowest per-layer ``{family}/{param}`` (older runs)."""
    values = _values(metrics, aggregate_key(family, "min"))
    if not values:
        per_layer = (_number(x) for r in metrics for x in layer_values(r, family).values())
        values = [v for v in per_layer if v is not None]
    return min(values) if values else None


def _total_flips(metrics: list[Mapping[str, Any]]) -> int | None:
    steps = [int(r["step"]) for r in metrics if _number(r.get("flips/total")) is not None]
    if not steps or steps != list(range(1, steps[-1] + 1)):
        return None
    return int(sum(_values(metrics, "flips/total")))


def pooled_stall_ratios(metrics: list[Mapping[str, Any]]) -> dict[str, float]:
    """Per layer with updates: its logged ``stall_ratio`` averaged with weights ``updates``, which is the
    pooled ratio ``1 - sum(updated flips) / sum(updates)`` over the logged steps."""
    weighted: dict[str, float] = {}
    updates: dict[str, float] = {}
    for record in metrics:
        for layer, count in layer_values(record, "updates").items():
            n, stall = _number(count), _number(record.get(metric_key("stall_ratio", layer)))
            if n is None or stall is None or n <= 0:
                continue
            updates[layer] = updates.get(layer, 0.0) + n
            weighted[layer] = weighted.get(layer, 0.0) + n * stall
    return {layer: weighted[layer] / n for layer, n in updates.items()}


def _first_event(events: list[Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    return next((e for e in events if e.get("kind") == kind and _number(e.get("step")) is not None), None)


def _reason(event: Mapping[str, Any]) -> str:
    message = event.get("message")
    return message if isinstance(message, str) and message else event.get("kind", "")


def summarize(metrics: Iterable[Mapping[str, Any]], events: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``SUMMARY_FIELDS`` of a run from its metrics and events records (None where not measured).

    A value that is None or NaN counts as not measured (pandas reads a missing key as NaN).
    """
    metrics, events = list(metrics), list(events)
    train_losses = [r for r in metrics if "train_loss" in r]
    final_val = (_values(metrics, "val_loss") or [None])[-1]
    val_losses, losses, speeds = _values(metrics, "val_loss"), _values(metrics, "train_loss"), _values(
        metrics, "tokens_per_s"
    )
    stalls = pooled_stall_ratios(metrics)
    warning, stop = _first_event(events, "rank_warning"), _first_event(events, "nan_stop")
    return {
        "final_train_loss": _number(train_losses[-1]["train_loss"]) if train_losses else None,
        "best_train_loss": min((v for v in losses if math.isfinite(v)), default=None),
        "final_val_loss": final_val,
        "best_val_loss": min(val_losses) if val_losses else None,
        "final_val_ppl": math.exp(min(final_val, 700.0)) if final_val is not None else None,
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "total_flips": _total_flips(metrics),
        "mean_stall_ratio": sum(stalls.values()) / len(stalls) if stalls else None,
        "min_stable_rank": _lowest(metrics, "stable_rank"),
        "min_effective_rank": _lowest(metrics, "effective_rank"),
        "first_rank_warning_step": int(warning["step"]) if warning else None,
        "collapse_step": int(stop["step"]) if stop else None,
        "collapse_reason": _reason(stop) if stop else None,
        "format_shifts": [dict(e) for e in events if e.get("kind") == "format_shift"],
    }
