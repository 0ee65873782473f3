"""The headline figures of a run: summary.json where it says, the metrics and events where it doesn't.

A crashed run has no summary.json (or a partial one); its figures are then derived from what was
logged, and a figure that cannot be derived honestly stays missing (NaN / None), never made up.

Example::

    >>> figures = summarize_run(load_run("runs/e4m3_adamw"))            # doctest: +SKIP
    >>> figures["best_val_loss"], figures["collapse_step"]              # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from altgrad import record
from altgrad.analysis.runs import Run, lookup, render_value

SUMMARY_FIELDS = tuple(name for name in record.SUMMARY_FIELDS if name != "format_shifts")
"""The figures ``summarize_run`` returns, in table order (``altgrad.record.SUMMARY_FIELDS`` defines them)."""

STEP_FIELDS = ("first_rank_warning_step", "collapse_step")
AGGREGATE_NAMES = record.AGGREGATE_NAMES


def layer_columns(run: Run, family: str) -> dict[str, str]:
    """Per-layer columns of a metric family: ``{"h.0.attn": "stall_ratio/h.0.attn", ...}``.

    ``family`` is the key prefix without the slash (``stall_ratio``, ``flip_rate``, ``stable_rank``).
    Aggregates such as ``stall_ratio/mean`` are left out.
    """
    prefix = f"{family}/"
    return {
        column[len(prefix) :]: column
        for column in run.columns(prefix)
        if column[len(prefix) :] not in AGGREGATE_NAMES
    }


def aggregate_series(run: Run, family: str, how: str) -> pd.Series:
    """``{family}/{how}`` as logged, else computed over the per-layer columns (``how`` = mean or min)."""
    logged = run.series(f"{family}/{how}")
    if len(logged):
        return logged
    columns = list(layer_columns(run, family).values())
    if not columns:
        return logged
    per_layer = run.metrics.set_index("step")[columns].apply(pd.to_numeric, errors="coerce")
    combined = per_layer.mean(axis=1) if how == "mean" else per_layer.min(axis=1)
    return combined.dropna().rename(f"{family}/{how}")


def derived_figures(run: Run) -> dict[str, Any]:
    """Every summary figure computed from metrics.jsonl and events.jsonl alone (``altgrad.record.summarize``,
    the trainer's own computation); a figure not measured is NaN, a step or reason None."""
    metrics = run.metrics.to_dict("records")
    events = run.events.to_dict("records") if "kind" in run.events.columns else []
    figures = record.summarize(metrics, events)
    for name in SUMMARY_FIELDS:
        if figures[name] is None and name not in (*STEP_FIELDS, "collapse_reason"):
            figures[name] = math.nan
    return figures


def summarize_run(run: Run) -> dict[str, Any]:
    """The ``SUMMARY_FIELDS`` of a run: summary.json values where present and not null, else derived."""
    derived = derived_figures(run)
    figures: dict[str, Any] = {}
    for name in SUMMARY_FIELDS:
        value = run.summary.get(name)
        figures[name] = derived[name] if value is None else value
    for name in STEP_FIELDS:
        if figures[name] is not None and not (isinstance(figures[name], float) and math.isnan(figures[name])):
            figures[name] = int(figures[name])
    return figures


def _formats_text(run: Run) -> str:
    """The quantization of a run: summary.json's ``quant`` (null = not quantized), else config.yaml's."""
    quant = run.summary["quant"] if "quant" in run.summary else lookup(run.config, "quant")
    if isinstance(quant, dict) and quant.get("enabled") is False:
        quant = None
    if quant is None:
        return "none (not quantized)" if "quant" in run.summary or run.config else "not recorded"
    if isinstance(quant, dict):
        shown = {
            key: value for key, value in quant.items() if key != "enabled" and value not in ([], 0, None)
        }
        return render_value(shown)
    return render_value(quant)


def describe_run(run: Run) -> dict[str, str]:
    """Name, status, precision, formats, optimizer and steps as text (summary.json, else config.yaml)."""

    def pick(summary_key: str, *config_keys: str) -> str:
        value = run.summary.get(summary_key)
        for key in config_keys:
            value = lookup(run.config, key) if value is None else value
        return "not recorded" if value is None else render_value(value)

    return {
        "name": run.name,
        "status": run.status,
        "precision": pick("precision", "train.precision", "precision"),
        "formats": _formats_text(run),
        "optimizer": pick("optimizer", "optimizer.name"),
        "steps": pick("steps", "train.max_steps"),
    }
