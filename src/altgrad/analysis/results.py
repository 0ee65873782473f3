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

from altgrad.analysis.matrix import Cell, short_labels
from altgrad.analysis.summaries import STEP_FIELDS, SUMMARY_FIELDS, summarize_run

LABEL_COLUMNS = (
    "cell",
    "group",
    "context",
    "label",
    "format",
    "optimizer",
    "seed",
    "baseline",
    "status",
    "error",
    "run",
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
"""Fields aggregated over seeds as mean and std (gap_to_fp32 = final val loss - mean fp32 final val loss)."""


def _status(cell: Cell) -> str:
    run_status = None if cell.run is None else cell.run.status
    if run_status and run_status != cell.status and cell.status == "completed":
        return f"completed, {run_status}"
    return cell.status


def results_table(cells: list[Cell]) -> pd.DataFrame:
    """One row per cell: labels, status, every summary figure and the gap to the fp32 baseline.

    ``group`` names the configuration without the seed, ``context`` without seed and optimizer, ``label``
    is a short name for the context (the format when that tells contexts apart).

    ``run`` is the run folder (None when the cell has none: then every figure is missing, NaN / None).
    """
    labels = short_labels(cells)
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
                "seed": cell.seed,
                "baseline": cell.baseline,
                "status": _status(cell),
                "error": cell.error,
                "run": None if cell.run is None else str(cell.run.path),
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
    reference = table.loc[table["baseline"] == GAP_REFERENCE, "final_val_loss"].dropna()
    table.insert(
        table.columns.get_loc("best_val_loss") + 1,
        "gap_to_fp32",
        table["final_val_loss"] - reference.mean() if len(reference) else math.nan,
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
