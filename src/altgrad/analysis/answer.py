"""The answer a matrix gives, per format: its gap to fp32, why, what recovers it, whether grid-aware
updates help. Every figure is read from the per-configuration results and the paired comparisons.

Per format (quantized configurations only, each optimizer at its chosen lr in its setting):

* standard gap: the AdamW (first of ``STANDARD_OPTIMIZERS``) fp32-master configuration's paired gap to
  fp32 with its 95% t interval, and the failure attribution of its runs (the cause of that gap);
* best: the (optimizer, storage, lr) with the lowest mean final val loss, its gap and failure modes;
* grid-aware vs standard: of the comparisons at equal format and storage, the one with the lowest mean
  paired difference, its interval and verdict, and how many comparisons were better / worse / unclear.

Example::

    >>> table = results_table(matrix.cells)                               # doctest: +SKIP
    >>> chosen = results_by_cell(at_chosen_lr(table))                    # doctest: +SKIP
    >>> answer_table(chosen, optimizer_comparison(table))                 # doctest: +SKIP
"""

from __future__ import annotations

import pandas as pd

from altgrad.analysis.comparisons import LOSS_METRIC, STANDARD_OPTIMIZERS
from altgrad.analysis.document import MISSING
from altgrad.analysis.matrix import MASTER_COPY as MASTER
from altgrad.analysis.stats import BETTER, CANNOT_TELL, WORSE, interval_text


def _gap(row: pd.Series) -> str:
    text = interval_text(row["gap_to_fp32_mean"], row["gap_ci_low"], row["gap_ci_high"], row["gap_n"])
    return text if text == MISSING else f"{text} {row['gap_verdict']}"


def answer_table(by_cell: pd.DataFrame, comparison: pd.DataFrame) -> pd.DataFrame:
    """One row per format; ``by_cell`` holds the configurations at their chosen lr (``results_by_cell``),
    ``comparison`` is ``optimizer_comparison``'s table."""
    quantized = by_cell[by_cell["baseline"].isna()]
    loss = comparison[comparison["metric"] == LOSS_METRIC] if len(comparison) else comparison
    rows = []
    for fmt, members in quantized.groupby("format", sort=False):
        master = members[members["storage"] == MASTER]
        # the reference optimizer of optimizer_comparison: the first of STANDARD_OPTIMIZERS present
        reference = next((name for name in STANDARD_OPTIMIZERS if name in set(master["optimizer"])), None)
        standard = master[master["optimizer"] == reference]
        ranked = members.dropna(subset=["val_loss_mean"]).sort_values("val_loss_mean", kind="stable")
        row = {"format": fmt}
        if len(standard):
            first = standard.iloc[0]
            row["gap to fp32, standard"] = f"{_gap(first)} ({first['optimizer']}, {MASTER})"
            row["cause (failure attribution)"] = first["failure_mode"] or MISSING
        else:
            row["gap to fp32, standard"] = f"no {'/'.join(STANDARD_OPTIMIZERS)} {MASTER} run"
            row["cause (failure attribution)"] = MISSING
        if len(ranked):
            best = ranked.iloc[0]
            row["best optimizer / storage (lr)"] = f"{best['optimizer']} / {best['storage']} ({best['lr']:g})"
            row["best: gap to fp32"] = _gap(best)
            row["best: failure"] = best["failure_mode"] or MISSING
        else:
            row["best optimizer / storage (lr)"] = row["best: gap to fp32"] = row["best: failure"] = MISSING
        row.update(_grid_aware(loss[loss["format"] == fmt] if len(loss) else loss))
        rows.append(row)
    return pd.DataFrame(rows)


def _grid_aware(loss: pd.DataFrame) -> dict[str, str]:
    if not len(loss):
        return {"grid-aware vs standard (best case)": MISSING, "grid-aware verdicts": MISSING}
    best = loss.sort_values("diff", kind="stable", na_position="last").iloc[0]
    counts = loss["verdict"].value_counts()
    text = interval_text(best["diff"], best["ci_low"], best["ci_high"], best["n"])
    return {
        "grid-aware vs standard (best case)": (
            f"{best['optimizer']} vs {best['reference']} on {best['storage']}: {text} {best['verdict']}"
        ),
        "grid-aware verdicts": ", ".join(
            f"{int(counts.get(verdict, 0))} {verdict}" for verdict in (BETTER, WORSE, CANNOT_TELL)
        ),
    }


def answer_findings(comparison: pd.DataFrame) -> list[str]:
    """Sentences: where grid-aware updates are better / worse than the standard optimizer by the interval,
    and the format with the largest confirmed gain (or that no format gains)."""
    if not len(comparison):
        return ["No setting was run with both a standard and a grid-aware optimizer."]
    loss = comparison[comparison["metric"] == LOSS_METRIC]

    def where(verdict: str) -> list[str]:
        chosen = loss[loss["verdict"] == verdict]
        return [
            f"{r['format']} / {r['storage']} / {r['optimizer']} "
            f"{interval_text(r['diff'], r['ci_low'], r['ci_high'], r['n'])}"
            for _, r in chosen.iterrows()
        ]

    better, worse = where(BETTER), where(WORSE)
    findings = [
        f"Grid-aware better than the standard optimizer (95% interval below 0) in {len(better)} of "
        f"{len(loss)} comparisons" + (": " + "; ".join(better) if better else "."),
        f"Worse (interval above 0) in {len(worse)}" + (": " + "; ".join(worse) if worse else "."),
    ]
    gains = loss[loss["verdict"] == BETTER]
    if len(gains):
        top = gains.sort_values("ci_high", kind="stable").iloc[0]
        findings.append(
            f"Largest confirmed gain (upper bound of the interval furthest below 0): {top['format']} with "
            f"{top['optimizer']} on {top['storage']}, "
            f"{interval_text(top['diff'], top['ci_low'], top['ci_high'], top['n'])}."
        )
    else:
        findings.append("No format gains from grid-aware updates by this test: no interval lies below 0.")
    return findings
