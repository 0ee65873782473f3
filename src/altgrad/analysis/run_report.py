"""The report of one run: header, summary table, failure analysis, loss / stall / flip / rank / overflow
plots, events.

Writes ``report.html`` (self-contained), ``report.md`` (+ ``figures/*.png``) and ``analysis.json`` (the
failure finding, see ``altgrad.analysis.failure``) into the run folder.
A metric family the run did not record gets the sentence "not recorded in this run", not an empty plot.

Example::

    >>> write_run_report("runs/e4m3_adamw")        # -> Path("runs/e4m3_adamw/report.html")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from altgrad.analysis.document import Document
from altgrad.analysis.failure import classify_failure, thresholds_text, write_analysis
from altgrad.analysis.plots import fractions_figure, layer_lines_figure, loss_figure, rank_figure
from altgrad.analysis.runs import Run, load_run
from altgrad.analysis.summaries import (
    SUMMARY_FIELDS,
    aggregate_series,
    derived_figures,
    describe_run,
    layer_columns,
    summarize_run,
)

EVENT_FIELDS = ("first_rank_warning_step", "collapse_step", "collapse_reason")
"""Figures that come from events: None means it did not happen (shown as "none")."""
TENSOR_KINDS = ("weight", "activation", "grad")
MAX_EVENT_ROWS = 100
NOT_RECORDED = "not recorded in this run"


def summary_table(run: Run) -> pd.DataFrame:
    """The summary figures of a run and where each comes from (summary.json, or derived from the logs).

    An event figure (rank warning, collapse) that did not happen reads "none"; a figure that was not
    recorded stays missing.
    """
    figures = summarize_run(run)
    derived = derived_figures(run)
    rows = []
    for name in SUMMARY_FIELDS:
        value, log = figures[name], "events.jsonl" if name in EVENT_FIELDS else "metrics.jsonl"
        if run.summary.get(name) is not None:
            source = "summary.json"
        elif derived[name] is not None and not pd.isna(derived[name]):
            source = log
        elif name in EVENT_FIELDS and (run.summary or not run.events.empty):
            value, source = "none", "summary.json" if run.summary else log
        else:
            source = ""
        rows.append({"figure": name, "value": value, "source": source})
    return pd.DataFrame(rows)


def _header(doc: Document, run: Run) -> None:
    description = describe_run(run)
    doc.table(pd.DataFrame({"field": list(description), "value": list(description.values())}))
    if run.notes:
        doc.heading("Reading notes", 3)
        doc.bullets(run.notes)


def _loss(doc: Document, run: Run) -> None:
    doc.heading("Loss")
    train, val = run.series("train_loss"), run.series("val_loss")
    if not len(train) and not len(val):
        doc.note(f"Loss: {NOT_RECORDED}.")
        return
    doc.figure(loss_figure(train, val), "loss", "Train loss and val loss (on the quantized model) over steps")


def _per_layer(doc: Document, run: Run, family: str, title: str, ylabel: str) -> None:
    doc.heading(title)
    columns = layer_columns(run, family)
    mean = aggregate_series(run, family, "mean")
    if not columns and not len(mean):
        doc.note(f"{ylabel.capitalize()}: {NOT_RECORDED}.")
        return
    per_layer = {layer: run.series(column) for layer, column in columns.items()}
    caption = f"{title} (thin: one line per layer; thick black: mean over layers)"
    doc.figure(layer_lines_figure(per_layer, mean, title, ylabel), family.replace("/", "_"), caption)


def _rank(doc: Document, run: Run) -> None:
    doc.heading("Rank health")
    stable = {param: run.series(column) for param, column in layer_columns(run, "stable_rank").items()}
    effective = {param: run.series(column) for param, column in layer_columns(run, "effective_rank").items()}
    if not stable and not effective:
        doc.note(f"Rank trajectories: {NOT_RECORDED}.")
        return
    warnings = [int(step) for step in run.events_of("rank_warning")["step"].dropna()]
    caption = f"Stable and effective rank per parameter; {len(warnings)} rank_warning event(s) marked in red"
    doc.figure(rank_figure(stable, effective, warnings), "rank", caption)


def _fractions(doc: Document, run: Run) -> None:
    doc.heading("Overflow and underflow by tensor kind")
    overflow = {kind: run.series(f"quant/overflow_frac/{kind}") for kind in TENSOR_KINDS}
    underflow = {kind: run.series(f"quant/underflow_frac/{kind}") for kind in TENSOR_KINDS}
    overflow = {kind: series for kind, series in overflow.items() if len(series)}
    underflow = {kind: series for kind, series in underflow.items() if len(series)}
    if not overflow and not underflow:
        doc.note(f"Overflow / underflow fractions: {NOT_RECORDED}.")
        return
    caption = (
        "Fraction of elements saturated (overflow) or flushed to zero (underflow), mean over quantized layers"
    )
    doc.figure(fractions_figure(overflow, underflow), "quant_fractions", caption)


def _failure(doc: Document, run: Run) -> None:
    doc.heading("Failure analysis")
    finding = classify_failure(run)
    doc.table(
        pd.DataFrame(
            {
                "failure": [finding.mode],
                "step": ["none" if finding.step is None else finding.step],
                "layers (worst first)": [", ".join(finding.layers) or "–"],
                "evidence": [finding.evidence],
            }
        )
    )
    doc.paragraph(thresholds_text())


def _events(doc: Document, run: Run) -> None:
    doc.heading("Events")
    if run.events.empty:
        doc.note(f"Events: {NOT_RECORDED}.")
        return
    counts = run.events["kind"].value_counts(sort=False)
    doc.table(pd.DataFrame({"kind": counts.index.astype(str), "count": counts.to_numpy()}))
    columns = ["step", "kind", "message"] + [
        c for c in ("layer", "layers", "metric") if c in run.events.columns
    ]
    shown = run.events[columns].head(MAX_EVENT_ROWS).copy()
    shown["step"] = [None if pd.isna(step) else int(step) for step in shown["step"]]
    if len(run.events) > MAX_EVENT_ROWS:
        doc.note(
            f"The first {MAX_EVENT_ROWS} of {len(run.events)} events are listed; all are in events.jsonl."
        )
    doc.table(shown)


def build_run_document(run: Run) -> Document:
    """The full report of one run, ready to ``write``."""
    doc = Document(f"Run report: {run.name}")
    _header(doc, run)
    doc.heading("Summary")
    doc.table(summary_table(run))
    doc.note("— = not recorded (or NaN). Derived figures come from the logged steps only.")
    _failure(doc, run)
    _loss(doc, run)
    _per_layer(doc, run, "stall_ratio", "Stall ratio per layer", "stall ratio")
    _per_layer(doc, run, "flip_rate", "Flip rate per layer", "flip rate")
    _rank(doc, run)
    _fractions(doc, run)
    _events(doc, run)
    return doc


def write_run_report(run_dir: str | Path) -> Path:
    """Write report.html, report.md, figures/ and analysis.json into ``run_dir``; return report.html."""
    run = load_run(run_dir)
    write_analysis(run)
    return build_run_document(run).write(run.path)
