"""The report of an experiment matrix: the answer per format, results per cell and over seeds with
paired intervals, plots per format, failure analysis, lr sweeps, grid-aware vs standard optimizers at
their best lr, equivalent formats, layer-rule sweet spots, missing cells.

Writes ``report.html`` (self-contained), ``report.md`` and ``figures/*.png`` into ``out_dir``
(default: the matrix folder), and the figures as ``results.csv`` (one row per configuration over its
seeds) and ``results_by_seed.csv`` (one row per run), from which every interval can be recomputed.

Example::

    >>> write_matrix_report("runs/matrix")          # -> Path("runs/matrix/report.html")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from altgrad.analysis.answer import answer_findings, answer_table
from altgrad.analysis.comparisons import (
    EQUIVALENCE_RTOL,
    SELECTION_BIAS,
    STANDARD_OPTIMIZERS,
    at_chosen_lr,
    equivalence_table,
    find_equivalent_pairs,
    lr_sweep,
    optimizer_comparison,
    rule_set_table,
)
from altgrad.analysis.document import MISSING, Document, format_cell
from altgrad.analysis.failure import thresholds_text
from altgrad.analysis.matrix import Cell, Matrix, load_matrix, short_labels
from altgrad.analysis.plots import (
    curves_figure,
    format_loss_figure,
    fractions_by_format_figure,
    heatmap_figure,
    lr_sweep_figure,
)
from altgrad.analysis.results import (
    GAP_REFERENCE,
    NUMERIC_FIELDS,
    aggregate_over_seeds,
    cell_failures,
    results_by_cell,
    results_by_seed,
    results_table,
)
from altgrad.analysis.runs import Run, render_value
from altgrad.analysis.stats import CONFIDENCE, interval_text
from altgrad.analysis.summaries import STEP_FIELDS, SUMMARY_FIELDS, aggregate_series, layer_columns

TENSOR_KINDS = ("weight", "activation", "grad")
RESULTS_CSV = "results.csv"
RESULTS_BY_SEED_CSV = "results_by_seed.csv"
FINISHED = ("completed", "nan_stop")
"""Cell statuses that are results (a NaN stop is a finding); any other status is listed as missing/failed."""
CELL_COLUMNS = (
    "cell",
    "label",
    "optimizer",
    "storage",
    "lr",
    "seed",
    "status",
    *SUMMARY_FIELDS[:4],
    "gap_to_fp32",
    *SUMMARY_FIELDS[4:],
)


def _mean_curve(series: list[pd.Series]) -> pd.Series:
    """Mean over seeds at each step (steps a seed did not log are left out of that step's mean)."""
    series = [s for s in series if len(s)]
    if not series:
        return pd.Series(dtype=float)
    return pd.concat(series, axis=1).sort_index().mean(axis=1).dropna()


def _by_curve(cells: list[Cell]) -> dict[tuple[str, str], list[Run]]:
    """Runs grouped by (plot label, optimizer), in matrix order."""
    labels = short_labels(cells)
    groups: dict[tuple[str, str], list[Run]] = {}
    for cell in cells:
        if cell.run is not None:
            groups.setdefault((labels[cell.context], cell.optimizer), []).append(cell.run)
    return groups


def _mean_std(mean: float, std: float, n: int, seeds: int) -> str:
    if math.isnan(mean):
        return MISSING
    text = format_cell(mean) if math.isnan(std) else f"{format_cell(mean)} ± {format_cell(std)}"
    return text if n == seeds else f"{text} (n={n})"


def seed_table_text(seeds: pd.DataFrame) -> pd.DataFrame:
    """The aggregated table as text: ``mean ± std`` (std only with >= 2 values), ``(n=k)`` when values
    are missing for some seeds, and for step fields how many seeds reached one and the earliest step."""
    rows = []
    for _, row in seeds.iterrows():
        text = {"group": row["group"], "seeds": row["seeds"], "completed": row["completed"]}
        for name in NUMERIC_FIELDS:
            text[name] = _mean_std(row[f"{name}_mean"], row[f"{name}_std"], row[f"{name}_n"], row["seeds"])
        for name in STEP_FIELDS:
            count, first = row[f"{name}_seeds"], row[f"{name}_first"]
            if count:
                text[name] = f"{count}/{row['seeds']} seeds, first at {int(first)}"
            else:
                text[name] = "none" if row["runs"] else MISSING
        text["collapse_reason"] = row["collapse_reasons"]
        rows.append(text)
    return pd.DataFrame(rows)


def by_cell_text(by_cell: pd.DataFrame) -> pd.DataFrame:
    """``results_by_cell`` as text, the gap as ``mean [low, high] verdict``."""
    gaps = [
        f"{interval_text(r.gap_to_fp32_mean, r.gap_ci_low, r.gap_ci_high, r.gap_n)} {r.gap_verdict}"
        if not math.isnan(r.gap_to_fp32_mean)
        else MISSING
        for r in by_cell.itertuples()
    ]
    shown = by_cell[["cell", "format", "optimizer", "storage", "lr", "n_seeds", "val_loss_mean"]].copy()
    shown[f"gap to {GAP_REFERENCE} [{CONFIDENCE:.0%} CI]"] = gaps
    shown["failure_mode"] = by_cell["failure_mode"].fillna(MISSING)
    return shown


def _cell_table_text(table: pd.DataFrame) -> pd.DataFrame:
    shown = table[list(CELL_COLUMNS)].rename(columns={"label": "format"})
    for name in STEP_FIELDS:
        shown[name] = [
            int(step) if not pd.isna(step) else "none" if pd.notna(run) else MISSING
            for step, run in zip(shown[name], table["run"], strict=True)
        ]
    return shown


def _overview(doc: Document, matrix: Matrix, table: pd.DataFrame) -> None:
    counts = Counter(cell.status for cell in matrix.cells)
    doc.paragraph(
        f"{len(matrix.cells)} cells: "
        + ", ".join(f"{count} {status}" for status, count in counts.items())
        + "."
    )
    if matrix.axes:
        values = [render_value(value).replace("; ", ", ") for value in matrix.axes.values()]
        doc.table(pd.DataFrame({"axis": list(matrix.axes), "values": values}))
    if matrix.notes:
        doc.bullets(matrix.notes)
    if not (table["baseline"] == GAP_REFERENCE).any():
        doc.note(f"No {GAP_REFERENCE} baseline cell: gap_to_fp32 cannot be computed.")


def _results(doc: Document, table: pd.DataFrame) -> None:
    doc.heading("Results per cell")
    doc.table(_cell_table_text(table))
    doc.note(
        f"{MISSING} = not recorded (or NaN). gap_to_fp32 = final val loss - final val loss of the "
        f"{GAP_REFERENCE} baseline run with the same seed (same initialisation and data order). "
        "Step columns: 'none' = did not happen."
    )
    doc.heading("Gap to fp32 per configuration")
    doc.table(by_cell_text(results_by_cell(table)))
    doc.note(
        f"Gap = mean over seeds of the paired gap to {GAP_REFERENCE}, with its {CONFIDENCE:.0%} t interval "
        "(n-1 degrees of freedom); 'better'/'worse' only when the interval excludes 0, else 'cannot "
        "tell'. Every row is in results.csv, every run in results_by_seed.csv."
    )
    doc.heading("Results over seeds")
    doc.table(seed_table_text(aggregate_over_seeds(table)))
    doc.note(
        "mean ± std over the seeds of a configuration (std only with >= 2 values); (n=k): only k seeds "
        "recorded the figure."
    )


def at_chosen_lr_cells(cells: list[Cell], table: pd.DataFrame) -> list[Cell]:
    """``cells`` without those of a swept (setting, optimizer) at an lr other than the chosen one."""
    sweep = lr_sweep(table)
    swept = sweep.groupby(["setting", "optimizer"], sort=False)["lr"].transform("size") > 1
    dropped = sweep[swept & ~sweep["chosen"]]
    dropped_keys = set(zip(dropped["setting"], dropped["optimizer"], dropped["lr"], strict=True))
    return [cell for cell in cells if (cell.setting, cell.optimizer, cell.lr) not in dropped_keys]


def _plots(doc: Document, cells: list[Cell], table: pd.DataFrame) -> None:
    doc.heading("Plots")
    shown = at_chosen_lr_cells(cells, table)
    if len(shown) < len(cells):
        doc.note("Each optimizer at its chosen lr (see Learning-rate sweeps); the other lrs are not plotted.")
    cells = shown
    quantized = [cell for cell in cells if not cell.baseline]
    curves = _by_curve(cells)
    _loss_plot(doc, quantized, [cell for cell in cells if cell.baseline])
    _stall_heatmap(doc, quantized)
    flip = {
        key: _mean_curve([aggregate_series(r, "flip_rate", "mean") for r in runs])
        for key, runs in curves.items()
    }
    flip = {key: series for key, series in flip.items() if len(series)}
    if flip:
        doc.figure(
            curves_figure(flip, "Flip rate over time (mean over layers and seeds)", "flip rate"),
            "flip_rate",
            "Flip rate per format (color) and optimizer (line style), mean over seeds",
        )
    else:
        doc.note("Flip rate: not recorded in any run.")
    _rank_plot(doc, curves)
    _fractions_plot(doc, curves)


def _loss_plot(doc: Document, quantized: list[Cell], baselines: list[Cell]) -> None:
    per_format: dict[str, dict[str, pd.Series]] = {}
    for (label, optimizer), runs in _by_curve(quantized).items():
        curve = _mean_curve([run.series("train_loss") for run in runs])
        if len(curve):
            per_format.setdefault(label, {})[optimizer] = curve
    reference = {}
    for name in dict.fromkeys(cell.baseline for cell in baselines):
        runs = [cell.run for cell in baselines if cell.baseline == name and cell.run is not None]
        curve = _mean_curve([run.series("train_loss") for run in runs])
        if len(curve):
            reference[str(name)] = curve
    if not per_format:
        doc.note("Loss curves: not recorded in any quantized run.")
        return
    doc.figure(
        format_loss_figure(per_format, reference),
        "loss_per_format",
        "Train loss per format, one line per optimizer (mean over seeds), baselines dashed",
    )


def _stall_heatmap(doc: Document, quantized: list[Cell]) -> None:
    labels = short_labels(quantized)
    optimizers = {cell.optimizer for cell in quantized}
    values: dict[str, dict[str, list[float]]] = {}
    for cell in quantized:
        if cell.run is None:
            continue
        column = (
            labels[cell.context] if len(optimizers) == 1 else f"{labels[cell.context]} / {cell.optimizer}"
        )
        for layer, name in layer_columns(cell.run, "stall_ratio").items():
            series = cell.run.series(name)
            if len(series):
                values.setdefault(column, {}).setdefault(layer, []).append(float(series.mean()))
    if not values:
        doc.note("Stall ratio per layer: not recorded in any run.")
        return
    frame = pd.DataFrame(
        {
            column: {layer: float(np.mean(v)) for layer, v in layers.items()}
            for column, layers in values.items()
        }
    )
    doc.figure(
        heatmap_figure(frame, "Stall ratio per layer (mean over the run and seeds)", "stall ratio"),
        "stall_heatmap",
        "Stall ratio heatmap, layer x format; '—' = not recorded for that layer",
    )


def _rank_plot(doc: Document, curves: dict[tuple[str, str], list[Run]]) -> None:
    ranks, markers = {}, {}
    for key, runs in curves.items():
        curve = _mean_curve([aggregate_series(run, "stable_rank", "min") for run in runs])
        if not len(curve):
            continue
        ranks[key] = curve
        steps = sorted(int(s) for run in runs for s in run.events_of("rank_warning")["step"].dropna())
        if steps:
            markers[key] = pd.Series(np.interp(steps, curve.index, curve.to_numpy()), index=steps)
    if not ranks:
        doc.note("Rank trajectories: not recorded in any run.")
        return
    figure = curves_figure(
        ranks, "Minimum stable rank over layers (mean over seeds)", "stable rank", markers, "rank_warning"
    )
    doc.figure(figure, "rank", "Minimum stable rank per format and optimizer; triangles: rank_warning events")


def _fractions_plot(doc: Document, curves: dict[tuple[str, str], list[Run]]) -> None:
    panels = {}
    for kind in TENSOR_KINDS:
        for side in ("overflow", "underflow"):
            column = f"quant/{side}_frac/{kind}"
            panel = {key: _mean_curve([run.series(column) for run in runs]) for key, runs in curves.items()}
            panels[(kind, side)] = {key: series for key, series in panel.items() if len(series)}
    if not any(panels.values()):
        doc.note("Overflow / underflow fractions: not recorded in any run.")
        return
    doc.figure(
        fractions_by_format_figure(panels),
        "quant_fractions",
        "Overflow / underflow fraction by tensor kind per format (mean over seeds)",
    )


def failure_table(cells: list[Cell]) -> pd.DataFrame:
    """The failure finding of every quantized cell with a run (see ``altgrad.analysis.failure``); the
    forward-cost threshold is relative to the gap to the fp32 baseline cell of the same seed, if any."""
    findings = cell_failures(cells)
    labels = short_labels(cells)
    rows = []
    for cell in cells:
        if (finding := findings.get(cell.name)) is None:
            continue
        rows.append(
            {
                "cell": cell.name,
                "format": labels[cell.context],
                "optimizer": cell.optimizer,
                "seed": cell.seed,
                "failure": finding.mode,
                "step": "none" if finding.step is None else finding.step,
                "layers first": ", ".join(finding.layers) or MISSING,
                "evidence": finding.evidence,
            }
        )
    return pd.DataFrame(rows)


def _failures(doc: Document, cells: list[Cell]) -> None:
    doc.heading("Failure analysis")
    doc.paragraph(thresholds_text())
    table = failure_table(cells)
    if table.empty:
        doc.note("No quantized run to analyse.")
        return
    digest = []
    for (fmt, optimizer), members in table.groupby(["format", "optimizer"], sort=False):
        modes = Counter(members["failure"])
        steps = [s for s in members["step"] if s != "none"]
        first = f", earliest at step {min(steps)}" if steps else ""
        parts = ", ".join(f"{mode} in {count} of {len(members)} run(s)" for mode, count in modes.items())
        digest.append(f"{fmt} / {optimizer}: {parts}{first}")
    doc.bullets(digest)
    doc.table(table)


def _lr_sweeps(doc: Document, table: pd.DataFrame) -> None:
    sweep = lr_sweep(table)
    swept = sweep.groupby(["setting", "optimizer"], sort=False)["lr"].transform("size") > 1
    if not swept.any():
        return
    doc.heading("Learning-rate sweeps")
    doc.paragraph(SELECTION_BIAS)
    shown = sweep[swept]
    chosen = shown[shown["chosen"]]
    doc.bullets(
        [
            f"{r.format} / {r.storage} / {r.optimizer}: lr {r.lr:g} (mean final val loss "
            f"{format_cell(r.val_loss_mean)} over {r.n_seeds} seed(s))"
            for r in chosen.itertuples()
        ]
    )
    doc.table(shown.drop(columns=["setting"]))
    curves: dict[str, dict[str, pd.Series]] = {}
    marks: dict[str, dict[str, float]] = {}
    short = dict(zip(shown["setting"], shown["format"] + " / " + shown["storage"], strict=True))
    if len(set(short.values())) < len(short):  # format and storage do not tell the settings apart
        short = {setting: setting for setting in short}
    for (optimizer, setting), members in shown.groupby(["optimizer", "setting"], sort=False):
        line = short[setting]
        curves.setdefault(optimizer, {})[line] = members.set_index("lr")["val_loss_mean"].sort_index()
        marks.setdefault(optimizer, {})[line] = float(members.loc[members["chosen"], "lr"].iloc[0])
    doc.figure(
        lr_sweep_figure(curves, marks),
        "lr_sweep",
        "Mean final val loss against the lr, per optimizer (its own unit); stars: the chosen lr",
    )


def _optimizers(doc: Document, table: pd.DataFrame) -> None:
    doc.heading("Grid-aware vs standard optimizers")
    comparison = optimizer_comparison(table)
    if comparison.empty:
        doc.note(
            f"No setting was run with both a standard optimizer ({', '.join(STANDARD_OPTIMIZERS)}) and "
            "another one."
        )
        return
    doc.paragraph(
        "Each optimizer at its chosen lr against the standard one at its chosen lr, in the same format and "
        "storage, paired by seed: diff = mean over seeds of (optimizer - reference), with its "
        f"{CONFIDENCE:.0%} t interval [ci_low, ci_high] (n-1 degrees of freedom). The verdict reads the "
        "interval only: 'better'/'worse' (final val loss) or 'lower'/'higher' (diagnostics) when it "
        "excludes 0, else 'cannot tell' (always with a single seed)."
    )
    columns = [
        "format",
        "storage",
        "optimizer",
        "lr",
        "reference",
        "reference_lr",
        "metric",
        "mean",
        "reference_mean",
        "diff",
        "ci_low",
        "ci_high",
        "n",
        "verdict",
    ]
    doc.table(comparison[columns])


def _answer(doc: Document, table: pd.DataFrame) -> None:
    doc.heading("The answer")
    chosen = at_chosen_lr(table)
    if chosen.empty:
        doc.note("No quantized run with a final val loss: nothing to answer yet.")
        return
    comparison = optimizer_comparison(table)
    doc.paragraph(
        f"Per format: the gap to {GAP_REFERENCE} of the standard recipe (fp32 master weights) and its "
        "cause (failure attribution, see Failure analysis), the configuration with the lowest mean final "
        "val loss, and whether grid-aware updates beat the standard optimizer at equal format and storage. "
        f"Gaps and differences are paired by seed with {CONFIDENCE:.0%} t intervals; 'better'/'worse' only "
        "when the interval excludes 0. 'Best' is picked on the same seeds it is reported on (optimistic); "
        "each optimizer runs at its chosen lr (see Learning-rate sweeps)."
    )
    doc.table(answer_table(results_by_cell(chosen), comparison))
    doc.bullets(answer_findings(comparison))


def _equivalents(doc: Document, cells: list[Cell], table: pd.DataFrame) -> None:
    pairs, notes = find_equivalent_pairs(cells)
    if not pairs and not notes:
        return
    doc.heading("Equivalent cells")
    doc.paragraph(
        "Formats whose values are equal up to a power-of-two factor, with the same special values, are "
        "the same grid: E1M6 and E0M7 are the same uniform grid of 128 magnitudes (E1M6's two binades "
        "share one spacing), float8_e4m3fn is E4M3. Amax scaling (per tensor, per channel, per row or per "
        "MX block) absorbs that factor, so the cells should give the same results. 'coincide' means the "
        f"losses agree within a relative {EQUIVALENCE_RTOL:g}."
    )
    if pairs:
        doc.table(equivalence_table(pairs, table))
    if notes:
        doc.bullets(notes)


def _rules(doc: Document, cells: list[Cell], table: pd.DataFrame) -> None:
    rules = rule_set_table(cells, table)
    if rules.empty:
        return
    doc.heading("Layer rules: sweet spot per layer type")
    best = rules.iloc[0]
    if pd.isna(best["final_val_loss_mean"]):
        doc.paragraph("No rule-set cell recorded a final val loss.")
    else:
        doc.paragraph(
            f"Best rule set ({best['optimizer']}): {best['rule set']} with final val loss "
            f"{format_cell(best['final_val_loss_mean'])} over {best['seeds']} seed(s)."
        )
    uniform = table[table["baseline"].isna() & table["cell"].isin([c.name for c in cells if c.rules is None])]
    uniform = uniform.dropna(subset=["final_val_loss"])
    if len(uniform):
        means = uniform.groupby("group", sort=False)["final_val_loss"].mean().sort_values()
        doc.paragraph(
            f"For reference, the best uniform configuration: {means.index[0]} "
            f"({format_cell(float(means.iloc[0]))})."
        )
    doc.table(rules)


def _missing(doc: Document, cells: list[Cell]) -> None:
    doc.heading("Missing or failed cells")
    missing = [cell for cell in cells if cell.run is None or cell.status not in FINISHED]
    if not missing:
        doc.paragraph("None: every cell completed and has a run folder.")
        return
    doc.table(
        pd.DataFrame(
            [
                {
                    "cell": cell.name,
                    "status": cell.status,
                    "run folder": "missing" if cell.run is None else cell.run.path.name,
                    "error": cell.error or MISSING,
                }
                for cell in missing
            ]
        )
    )


def build_matrix_document(matrix: Matrix, table: pd.DataFrame | None = None) -> Document:
    """The full matrix report, ready to ``write`` (``table``: the matrix's ``results_table``, if made)."""
    table = results_table(matrix.cells) if table is None else table
    doc = Document(f"Matrix report: {matrix.path.resolve().name}")
    _answer(doc, table)
    _overview(doc, matrix, table)
    _results(doc, table)
    _plots(doc, matrix.cells, table)
    _failures(doc, matrix.cells)
    _lr_sweeps(doc, table)
    _optimizers(doc, table)
    _equivalents(doc, matrix.cells, table)
    _rules(doc, matrix.cells, table)
    _missing(doc, matrix.cells)
    return doc


def write_matrix_report(matrix_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write report.html, report.md, figures/, results.csv and results_by_seed.csv for a matrix folder;
    return the path of report.html."""
    matrix = load_matrix(matrix_dir)
    out_dir = Path(matrix_dir) if out_dir is None else Path(out_dir)
    table = results_table(matrix.cells)
    html = build_matrix_document(matrix, table).write(out_dir)
    results_by_cell(table).to_csv(out_dir / RESULTS_CSV, index=False)
    results_by_seed(table).to_csv(out_dir / RESULTS_BY_SEED_CSV, index=False)
    return html
