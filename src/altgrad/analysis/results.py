"""The results of a matrix as DataFrames: one row per cell, and aggregated over seeds.

Example::

    >>> table = results_table(load_matrix("runs/matrix").cells)           # doctest: +SKIP
    >>> table.set_index("cell").loc["e4m3-adamw-s0", "gap_to_fp32"]       # doctest: +SKIP
    >>> seeds = aggregate_over_seeds(table)                               # doctest: +SKIP
    >>> seeds[["group", "final_val_loss_mean", "final_val_loss_std"]]     # doctest: +SKIP
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from altgrad.analysis.failure import FailureFinding, classify_failure
from altgrad.analysis.matrix import Cell, short_labels
from altgrad.analysis.stats import interval_verdict, mean_ci
from altgrad.analysis.summaries import STEP_FIELDS, SUMMARY_FIELDS, summarize_run

LABEL_COLUMNS = (
    "cell",
    "group",
    "context",
    "label",
    "format",
    "optimizer",
    "storage",
    "lr",
    "setting",
    "seed",
    "baseline",
    "status",
    "error",
    "run",
    "failure_mode",
)
GAP_REFERENCE = "fp32"
NUMERIC_FIELDS = (
    "final_train_loss",
    "best_train_loss",
    "final_val_loss",
    "best_val_loss",
    "gap_to_fp32",
    "final_val_ppl",
    "tokens_per_s",
    "total_flips",
    "mean_stall_ratio",
    "min_stable_rank",
    "min_effective_rank",
)
"""Fields aggregated over seeds as mean and std (gap_to_fp32 = final val loss - fp32 final val loss of the
same seed)."""


def _status(cell: Cell) -> str:
    run_status = None if cell.run is None else cell.run.status
    if run_status and run_status != cell.status and cell.status == "completed":
        return f"completed, {run_status}"
    return cell.status


def cell_failures(cells: list[Cell]) -> dict[str, FailureFinding]:
    """The failure finding of every quantized cell with a run, by cell name: ``classify_failure`` with the
    fp32 baseline run of the same seed (if any), so that every table of a report gives one finding."""
    fp32 = {cell.seed: cell.run for cell in cells if cell.baseline == GAP_REFERENCE and cell.run is not None}
    return {
        cell.name: classify_failure(cell.run, baseline=fp32.get(cell.seed))
        for cell in cells
        if not cell.baseline and cell.run is not None
    }


def results_table(cells: list[Cell]) -> pd.DataFrame:
    """One row per cell: labels, status, every summary figure and the gap to the fp32 baseline.

    ``group`` names the configuration without the seed, ``context`` without seed and optimizer, ``label``
    is a short name for the context (the format when that tells contexts apart).

    ``run`` is the run folder (None when the cell has none: then every figure is missing, NaN / None).
    ``gap_to_fp32`` is paired by seed: final val loss - final val loss of the fp32 baseline with the same
    seed (NaN when there is none). ``failure_mode`` is ``cell_failures``' mode (None for baselines).
    """
    labels = short_labels(cells)
    failures = cell_failures(cells)
    rows = []
    for cell in cells:
        figures = summarize_run(cell.run) if cell.run is not None else dict.fromkeys(SUMMARY_FIELDS)
        rows.append(
            {
                "cell": cell.name,
                "group": cell.group,
                "context": cell.context,
                "label": labels[cell.context],
                "format": cell.format,
                "optimizer": cell.optimizer,
                "storage": cell.storage,
                "lr": cell.lr,
                "setting": cell.setting,
                "seed": cell.seed,
                "baseline": cell.baseline,
                "status": _status(cell),
                "error": cell.error,
                "run": None if cell.run is None else str(cell.run.path),
                "failure_mode": failures[cell.name].mode if cell.name in failures else None,
                **figures,
            }
        )
    table = pd.DataFrame(rows, columns=[*LABEL_COLUMNS, *SUMMARY_FIELDS])
    for name in SUMMARY_FIELDS:
        if name in STEP_FIELDS:
            table[name] = pd.array(
                [None if v is None or pd.isna(v) else int(v) for v in table[name]], dtype="Int64"
            )
        elif name != "collapse_reason":
            table[name] = pd.to_numeric(table[name], errors="coerce").astype(float)
    reference = table[table["baseline"] == GAP_REFERENCE].dropna(subset=["final_val_loss"])
    fp32_by_seed = reference.groupby("seed")["final_val_loss"].mean()  # one fp32 run per seed in a grid
    table.insert(
        table.columns.get_loc("best_val_loss") + 1,
        "gap_to_fp32",
        table["final_val_loss"] - table["seed"].map(fp32_by_seed).astype(float),
    )
    return table


def aggregate_over_seeds(table: pd.DataFrame) -> pd.DataFrame:
    """One row per group (cells differing only in seed): ``{field}_mean``, ``{field}_std`` (NaN with one
    value), ``{field}_n`` (values that entered the mean) for every numeric field; for the step fields the
    number of seeds where it happened and the earliest step; the distinct collapse reasons; ``runs`` = the
    members with a run folder."""
    rows = []
    for group, members in table.groupby("group", sort=False):
        first = members.iloc[0]
        row = {
            "group": group,
            "context": first["context"],
            "label": first["label"],
            "format": first["format"],
            "optimizer": first["optimizer"],
            "baseline": first["baseline"],
            "seeds": len(members),
            "runs": int(members["run"].notna().sum()),
            "completed": int(members["status"].str.startswith("completed").sum()),
        }
        for name in NUMERIC_FIELDS:
            values = members[name].dropna().to_numpy(dtype=float)
            row[f"{name}_mean"] = float(np.mean(values)) if len(values) else math.nan
            row[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) >= 2 else math.nan
            row[f"{name}_n"] = len(values)
        for name in STEP_FIELDS:
            steps = members[name].dropna()
            row[f"{name}_seeds"] = len(steps)
            row[f"{name}_first"] = int(steps.min()) if len(steps) else None
        reasons = members["collapse_reason"].dropna().astype(str).unique()
        row["collapse_reasons"] = "; ".join(reasons) if len(reasons) else None
        rows.append(row)
    return pd.DataFrame(rows)


BY_SEED_COLUMNS = (
    "cell", "run", "format", "optimizer", "storage", "lr", "seed", "status",
    "val_loss", "fp32_val_loss", "gap_to_fp32", "failure_mode",
)  # fmt: skip
"""results_by_seed.csv: one row per run; ``cell`` names the configuration (every seed of it alike)."""


def results_by_seed(table: pd.DataFrame) -> pd.DataFrame:
    """One row per run of ``results_table``: its configuration (``cell``), seed, final val loss, the fp32
    baseline's final val loss at the same seed, and their difference."""
    frame = table.rename(columns={"cell": "run", "group": "cell", "final_val_loss": "val_loss"})
    frame["fp32_val_loss"] = frame["val_loss"] - frame["gap_to_fp32"]
    return frame[list(BY_SEED_COLUMNS)].reset_index(drop=True)


def _modes_text(modes: pd.Series) -> str | None:
    """``optimizer update`` when every run agrees, else ``optimizer update (2/3); none observed (1/3)``."""
    counts = modes.dropna().value_counts(sort=True)
    if not len(counts):
        return None
    if len(counts) == 1:
        return str(counts.index[0])
    return "; ".join(f"{mode} ({count}/{int(counts.sum())})" for mode, count in counts.items())


def results_by_cell(table: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (``cell``, all seeds): mean final val loss, the paired gap to fp32 with
    its 95% t interval over seeds (``altgrad.analysis.stats``), the verdict from that interval, and the
    failure modes of its runs. Recomputable from ``results_by_seed`` (group by ``cell``, ``gap_to_fp32``)."""
    rows = []
    for group, members in table.groupby("group", sort=False):
        first = members.iloc[0]
        gaps = members["gap_to_fp32"].dropna().to_numpy(dtype=float)
        gap_mean, gap_low, gap_high = mean_ci(gaps)
        losses = members["final_val_loss"].dropna().to_numpy(dtype=float)
        rows.append(
            {
                "cell": group,
                "format": first["format"],
                "optimizer": first["optimizer"],
                "storage": first["storage"],
                "lr": first["lr"],
                "baseline": first["baseline"],
                "n_seeds": len(losses),
                "val_loss_mean": float(losses.mean()) if len(losses) else math.nan,
                "val_loss_std": float(losses.std(ddof=1)) if len(losses) >= 2 else math.nan,
                "gap_n": len(gaps),
                "gap_to_fp32_mean": gap_mean,
                "gap_ci_low": gap_low,
                "gap_ci_high": gap_high,
                "gap_verdict": interval_verdict(gap_low, gap_high),
                "failure_mode": _modes_text(members["failure_mode"]),
            }
        )
    return pd.DataFrame(rows)
