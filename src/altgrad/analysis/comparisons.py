"""Comparisons across cells: each optimizer at its best lr, grid-aware vs standard optimizers paired by
seed, equivalent formats, layer-rule sweet spots.

Example::

    >>> table = results_table(matrix.cells)                               # doctest: +SKIP
    >>> lr_sweep(table)[["format", "optimizer", "lr", "val_loss_mean", "chosen"]]  # doctest: +SKIP
    >>> optimizer_comparison(table)[["format", "optimizer", "diff", "ci_low", "verdict"]]  # doctest: +SKIP
    >>> equivalent_pairs(matrix.cells, table)                             # doctest: +SKIP
    >>> rule_sets(matrix.cells, table)                                    # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from altgrad.analysis.matrix import FORMAT_KEYS, Cell
from altgrad.analysis.runs import lookup, render_value
from altgrad.analysis.stats import paired_difference

STANDARD_OPTIMIZERS = ("adamw", "adam", "sgd")
"""The reference in each comparison is the first of these present for the setting."""
LOSS_METRIC = "final_val_loss"
DIAGNOSTIC_METRICS = ("mean_stall_ratio", "min_stable_rank")
"""Compared like the loss, with "lower"/"higher" instead of "better"/"worse" (neither is good per se)."""
SELECTION_BIAS = (
    "Each optimizer runs at the lr with the lowest mean final val loss over seeds among the lrs swept "
    "for it in the same setting. The lr is chosen on the same seeds it is then compared on, so a swept "
    "optimizer's figures are optimistic by the spread among its lrs (every optimizer swept alike keeps "
    "the comparison between them roughly fair; a gap to the unswept fp32 baseline is biased towards 0). "
    "For an unbiased check, rerun the chosen lrs on new seeds."
)
EQUIVALENCE_RTOL = 1e-3
"""Equivalent cells coincide when their losses agree to this relative tolerance."""


def lr_sweep(table: pd.DataFrame) -> pd.DataFrame:
    """Per quantized (setting, optimizer, lr): mean final val loss over seeds and how many seeds recorded
    it; ``chosen`` marks, per (setting, optimizer), the lr with the lowest mean (the first on a tie).

    Columns: setting, format, storage, optimizer, lr, n_seeds, val_loss_mean, chosen.
    """
    quantized = table[table["baseline"].isna()]
    rows = []
    for (setting, optimizer, lr), members in quantized.groupby(
        ["setting", "optimizer", "lr"], sort=False, dropna=False
    ):
        losses = members[LOSS_METRIC].dropna()
        rows.append(
            {
                "setting": setting,
                "format": members["format"].iloc[0],
                "storage": members["storage"].iloc[0],
                "optimizer": optimizer,
                "lr": lr,
                "n_seeds": len(losses),
                "val_loss_mean": float(losses.mean()) if len(losses) else math.nan,
            }
        )
    sweep = pd.DataFrame(rows, columns=["setting", "format", "storage", "optimizer", "lr", "n_seeds",
                                        "val_loss_mean"])  # fmt: skip
    sweep["chosen"] = False
    for _, members in sweep.groupby(["setting", "optimizer"], sort=False):
        if members["val_loss_mean"].notna().any():
            sweep.loc[members["val_loss_mean"].idxmin(), "chosen"] = True
    return sweep


def at_chosen_lr(table: pd.DataFrame) -> pd.DataFrame:
    """The runs of ``table`` at their optimizer's chosen lr in their setting (baselines dropped)."""
    chosen = lr_sweep(table)
    chosen = chosen.loc[chosen["chosen"], ["setting", "optimizer", "lr"]]
    quantized = table[table["baseline"].isna()]
    return quantized.merge(chosen, on=["setting", "optimizer", "lr"], how="inner")


def _by_seed(rows: pd.DataFrame, metric: str) -> dict:
    return {seed: float(value) for seed, value in zip(rows["seed"], rows[metric], strict=True)}


def optimizer_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """Per setting (format, storage, ...), every optimizer at its chosen lr vs the standard one at its
    chosen lr, paired by seed: the mean difference (optimizer - reference) with its 95% t interval.

    Columns: setting, format, storage (the reference's; the grid optimizer has its own), optimizer, lr,
    reference, reference_lr, metric, mean, reference_mean, diff, ci_low, ci_high, n, verdict. For the
    final val loss the verdict is "better", "worse" or "cannot tell"; for the diagnostics "lower",
    "higher" or "cannot tell".
    """
    rows = []
    for setting, members in at_chosen_lr(table).groupby("setting", sort=False):
        optimizers = list(dict.fromkeys(members["optimizer"]))
        reference = next((name for name in STANDARD_OPTIMIZERS if name in optimizers), None)
        if reference is None:
            continue
        ref_rows = members[members["optimizer"] == reference]
        for optimizer in optimizers:
            if optimizer == reference:
                continue
            rows_a = members[members["optimizer"] == optimizer]
            for metric in (LOSS_METRIC, *DIAGNOSTIC_METRICS):
                names = {} if metric == LOSS_METRIC else {"lower": "lower", "higher": "higher"}
                paired = paired_difference(_by_seed(rows_a, metric), _by_seed(ref_rows, metric), **names)
                rows.append(
                    {
                        "setting": setting,
                        "format": members["format"].iloc[0],
                        "storage": ref_rows["storage"].iloc[0],
                        "optimizer": optimizer,
                        "lr": rows_a["lr"].iloc[0],
                        "reference": reference,
                        "reference_lr": ref_rows["lr"].iloc[0],
                        "metric": metric,
                        "mean": float(rows_a[metric].mean()),
                        "reference_mean": float(ref_rows[metric].mean()),
                        "diff": paired.mean,
                        "ci_low": paired.ci_low,
                        "ci_high": paired.ci_high,
                        "n": paired.n,
                        "verdict": paired.verdict,
                    }
                )
    return pd.DataFrame(rows)


def absorbs_grid_scale(config: dict) -> bool | None:
    """True when the config's scaling absorbs a power-of-two factor between equivalent grids (a scaling
    mode of ``SCALING_MODES``, all of which set the scale from the amax relative to the format's range,
    and no format shifts, which would walk E1M6 and E0M7 to different formats); None when the config
    does not say its scaling mode."""
    from altgrad.integration.quant_spec import SCALING_MODES  # here: reading runs needs no torch

    scaling = lookup(config, "quant.scaling")
    if scaling is None:
        return None
    return str(scaling) in SCALING_MODES and lookup(config, "stability.format_shift") is not True


@dataclass
class EquivalentPair:
    """Two cells expected to give the same results, and why."""

    first: Cell
    second: Cell
    reason: str


def find_equivalent_pairs(cells: list[Cell]) -> tuple[list[EquivalentPair], list[str]]:
    """Pairs marked ``equivalent_to`` in matrix.json, and cells under amax scaling whose quant formats are
    the same grids (``formats.same_grid``: E1M6 / E0M7, E4M3 / float8_e4m3fn) and that agree on every
    other axis. Also returns notes on such pairs that could not be confirmed."""
    by_name = {cell.name: cell for cell in cells}
    pairs: dict[frozenset, EquivalentPair] = {}
    notes = []
    for cell in cells:
        other = by_name.get(cell.equivalent_to) if cell.equivalent_to else None
        if cell.equivalent_to and other is None:
            notes.append(f"{cell.name}: equivalent_to {cell.equivalent_to!r} is not a cell of this matrix")
        if other is not None:
            pairs.setdefault(
                frozenset((cell.name, other.name)), EquivalentPair(cell, other, "marked in matrix.json")
            )
    for a in cells:
        for b in cells:
            swapped = _swapped_key(a, b)
            if swapped is None or frozenset((a.name, b.name)) in pairs:
                continue
            scaling = [None if c.run is None else absorbs_grid_scale(c.run.config) for c in (a, b)]
            if all(scaling):
                reason = f"{swapped} under amax scaling"
                pairs[frozenset((a.name, b.name))] = EquivalentPair(a, b, reason)
            else:
                notes.append(
                    f"{a.name} vs {b.name}: {swapped}, but the configs do not show amax scaling without "
                    "format shifts for both, so they are not treated as the same grid"
                )
    return list(pairs.values()), notes


def _swapped_key(a: Cell, b: Cell) -> str | None:
    """``"quant.weight: E1M6 vs E0M7"`` when the assignments of ``a`` and ``b`` differ only in quant
    format keys (``FORMAT_KEYS``), each by two different formats of the same grid; else None."""
    if a.baseline or b.baseline or a.assignment.keys() != b.assignment.keys():
        return None
    differing = [
        key for key in a.assignment if render_value(a.assignment[key]) != render_value(b.assignment[key])
    ]
    same = [
        set(key.split(",")) <= set(FORMAT_KEYS) and _same_grid_formats(a.assignment[key], b.assignment[key])
        for key in differing
    ]
    if not differing or not all(same):
        return None
    return "; ".join(f"{key}: {a.assignment[key]} vs {b.assignment[key]}" for key in differing)


def _same_grid_formats(first: Any, second: Any) -> bool:
    """Whether two assignment values are formats (full precision excluded) of the same grid."""
    from altgrad.quantization.formats import parse_format, same_grid  # here: reading runs needs no torch

    try:
        formats = [parse_format(value) if isinstance(value, str) else None for value in (first, second)]
    except ValueError:
        return False
    return None not in formats and same_grid(*formats)


def _relative_difference(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def equivalence_table(pairs: list[EquivalentPair], table: pd.DataFrame) -> pd.DataFrame:
    """For each pair: final train/val loss of both, the largest relative train-loss difference over their
    common steps, and whether the results coincide (within ``EQUIVALENCE_RTOL``)."""
    figures = table.set_index("cell")
    rows = []
    for pair in pairs:
        a, b = figures.loc[pair.first.name], figures.loc[pair.second.name]
        curve_diff = math.nan
        if pair.first.run is not None and pair.second.run is not None:
            ca, cb = pair.first.run.series("train_loss"), pair.second.run.series("train_loss")
            common = ca.index.intersection(cb.index)
            if len(common):
                scale = np.maximum(np.maximum(ca[common].abs(), cb[common].abs()), 1e-12)
                curve_diff = float(((ca[common] - cb[common]).abs() / scale).max())
        diffs = [_relative_difference(a[name], b[name]) for name in ("final_train_loss", "final_val_loss")]
        diffs.append(curve_diff)
        known = [d for d in diffs if not math.isnan(d)]
        if not known:
            outcome = "cannot compare: results missing"
        elif max(known) <= EQUIVALENCE_RTOL:
            outcome = f"coincide (largest relative difference {max(known):.2g} <= {EQUIVALENCE_RTOL:g})"
        else:
            outcome = f"differ (largest relative difference {max(known):.2g} > {EQUIVALENCE_RTOL:g})"
        rows.append(
            {
                "cell": pair.first.name,
                "equivalent to": pair.second.name,
                "why": pair.reason,
                "final_train_loss": a["final_train_loss"],
                "other final_train_loss": b["final_train_loss"],
                "final_val_loss": a["final_val_loss"],
                "other final_val_loss": b["final_val_loss"],
                "max rel. diff of train loss curve": curve_diff,
                "results": outcome,
            }
        )
    return pd.DataFrame(rows)


def rule_set_table(cells: list[Cell], table: pd.DataFrame) -> pd.DataFrame:
    """Cells with layer rules (``quant.rules``), grouped by rule set and optimizer, best final val loss first.

    Columns: rule set (its name in the assignment, else the rules), rules, optimizer, seeds,
    final_val_loss_mean, final_val_loss_std, best_val_loss_mean.
    """
    figures = table.set_index("cell")
    rows = []
    for cell in cells:
        if cell.rules is None:
            continue
        label = cell.assignment.get("quant.rules", cell.rules)
        rows.append(
            {
                "rule set": render_value(label),
                "rules": render_value(cell.rules),
                "optimizer": cell.optimizer,
                "final_val_loss": figures.loc[cell.name, "final_val_loss"],
                "best_val_loss": figures.loc[cell.name, "best_val_loss"],
            }
        )
    if not rows:
        return pd.DataFrame()
    grouped = pd.DataFrame(rows).groupby(["rule set", "rules", "optimizer"], sort=False)
    result = grouped.agg(
        seeds=("final_val_loss", "size"),
        final_val_loss_mean=("final_val_loss", "mean"),
        final_val_loss_std=("final_val_loss", "std"),
        best_val_loss_mean=("best_val_loss", "mean"),
    ).reset_index()
    return result.sort_values("final_val_loss_mean", na_position="last").reset_index(drop=True)
