"""Comparisons across cells: grid-aware vs standard optimizers, equivalent formats, layer-rule sweet spots.

Example::

    >>> table = results_table(matrix.cells)                               # doctest: +SKIP
    >>> optimizer_comparison(table)[["format", "optimizer", "metric", "diff", "verdict"]]  # doctest: +SKIP
    >>> equivalent_pairs(matrix.cells, table)                             # doctest: +SKIP
    >>> rule_sets(matrix.cells, table)                                    # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from altgrad.analysis.matrix import Cell
from altgrad.analysis.runs import lookup, render_value

STANDARD_OPTIMIZERS = ("adamw", "adam", "sgd")
"""The reference in each comparison is the first of these present for the format."""
NOISE_MULTIPLE = 2.0
"""A difference is within noise when |diff| < NOISE_MULTIPLE x pooled std across seeds."""
COMPARED_METRICS = ("final_val_loss", "mean_stall_ratio", "min_stable_rank")
ONE_SEED = "cannot tell: one seed"
EQUIVALENT_FORMATS = ("E1M6", "E0M7")
"""The same uniform grid of 128 magnitudes up to a power-of-two factor, which amax scaling absorbs."""
EQUIVALENCE_RTOL = 1e-3
"""Equivalent cells coincide when their losses agree to this relative tolerance."""
AMAX_SCALINGS = ("delayed", "current", "per_channel", "mx")
"""``quant.scaling`` modes that set the scale from the amax relative to the format's range (per tensor from
an amax history or the current amax, per output channel, per MX block as a power of two)."""


def _pooled_std(a: np.ndarray, b: np.ndarray) -> float:
    dof = len(a) + len(b) - 2
    return math.sqrt(((len(a) - 1) * np.var(a, ddof=1) + (len(b) - 1) * np.var(b, ddof=1)) / dof)


def verdict(metric: str, name: str, reference: str, a: np.ndarray, b: np.ndarray) -> tuple[float, float, str]:
    """(mean difference a - b, pooled std, plain-language verdict) for the per-seed values ``a`` vs ``b``."""
    if not len(a) or not len(b):
        missing = [label for label, values in ((name, a), (reference, b)) if not len(values)]
        return math.nan, math.nan, f"not recorded for {' and '.join(missing)}"
    diff = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, ONE_SEED
    pooled = _pooled_std(a, b)
    if diff == 0.0:
        return diff, pooled, "no difference"
    bound = NOISE_MULTIPLE * pooled
    if abs(diff) < bound:
        return (
            diff,
            pooled,
            f"within noise: the difference {abs(diff):.3g} is below "
            f"{NOISE_MULTIPLE:g} x pooled std {bound:.3g}",
        )
    direction = "lower" if diff < 0 else "higher"
    return (
        diff,
        pooled,
        (
            f"{name} gives {direction} {metric} than {reference} by {abs(diff):.3g} "
            f"(> {NOISE_MULTIPLE:g} x pooled std {bound:.3g})"
        ),
    )


def _recorded_metric(metric: str, a: pd.DataFrame, b: pd.DataFrame) -> str:
    """``metric``, or the final train loss for the final val loss when a side never recorded a val loss."""
    if metric == "final_val_loss" and not (a[metric].notna().any() and b[metric].notna().any()):
        return "final_train_loss"
    return metric


def optimizer_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """Per format (context), every optimizer vs the standard one on ``COMPARED_METRICS``.

    Columns: context, format, optimizer, reference, metric, mean, reference_mean, diff, pooled_std, n,
    reference_n, verdict. The final loss is the val loss, or the train loss where val was not recorded.
    """
    rows = []
    quantized = table[table["baseline"].isna()]
    for context, members in quantized.groupby("context", sort=False):
        optimizers = list(dict.fromkeys(members["optimizer"]))
        reference = next((name for name in STANDARD_OPTIMIZERS if name in optimizers), None)
        if reference is None:
            continue
        ref_rows = members[members["optimizer"] == reference]
        for optimizer in optimizers:
            if optimizer == reference:
                continue
            rows_a = members[members["optimizer"] == optimizer]
            for wanted in COMPARED_METRICS:
                metric = _recorded_metric(wanted, rows_a, ref_rows)
                a = rows_a[metric].dropna().to_numpy(dtype=float)
                b = ref_rows[metric].dropna().to_numpy(dtype=float)
                diff, pooled, text = verdict(metric, optimizer, reference, a, b)
                rows.append(
                    {
                        "context": context,
                        "format": members["label"].iloc[0],
                        "optimizer": optimizer,
                        "reference": reference,
                        "metric": metric,
                        "mean": float(np.mean(a)) if len(a) else math.nan,
                        "reference_mean": float(np.mean(b)) if len(b) else math.nan,
                        "diff": diff,
                        "pooled_std": pooled,
                        "n": len(a),
                        "reference_n": len(b),
                        "verdict": text,
                    }
                )
    return pd.DataFrame(rows)


def absorbs_grid_scale(config: dict) -> bool | None:
    """True when the config's scaling absorbs a power-of-two factor between equivalent grids (an amax
    scaling mode and no format shifts, which would walk E1M6 and E0M7 to different formats); None when
    the config does not say its scaling mode."""
    scaling = lookup(config, "quant.scaling")
    if scaling is None:
        return None
    return str(scaling) in AMAX_SCALINGS and lookup(config, "stability.format_shift") is not True


@dataclass
class EquivalentPair:
    """Two cells expected to give the same results, and why."""

    first: Cell
    second: Cell
    reason: str


def find_equivalent_pairs(cells: list[Cell]) -> tuple[list[EquivalentPair], list[str]]:
    """Pairs marked ``equivalent_to`` in matrix.json, and E1M6 / E0M7 cells under amax scaling that agree
    on every other axis. Also returns notes on E1M6 / E0M7 pairs that could not be confirmed."""
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
                reason = f"{swapped}: E1M6 vs E0M7 under amax scaling"
                pairs[frozenset((a.name, b.name))] = EquivalentPair(a, b, reason)
            else:
                notes.append(
                    f"{a.name} vs {b.name}: E1M6 vs E0M7, but the configs do not show amax scaling without "
                    "format shifts for both, so they are not treated as the same grid"
                )
    return list(pairs.values()), notes


def _swapped_key(a: Cell, b: Cell) -> str | None:
    """The assignment keys where ``a`` has E1M6 and ``b`` E0M7, all other assignments equal; else None."""
    if a.baseline or b.baseline or a.assignment.keys() != b.assignment.keys():
        return None
    differing = [
        key for key in a.assignment if render_value(a.assignment[key]) != render_value(b.assignment[key])
    ]
    swapped = all(
        (str(a.assignment[key]).upper(), str(b.assignment[key]).upper()) == EQUIVALENT_FORMATS
        for key in differing
    )
    return ", ".join(differing) if differing and swapped else None


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
