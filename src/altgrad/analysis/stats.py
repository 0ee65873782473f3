"""Paired statistics over seeds: the mean paired difference, its t confidence interval, and a verdict
read from the interval alone.

Runs of two configurations with the same seed share the initialisation and the data order, so the
difference ``d_s = a_s - b_s`` removes most of the seed-to-seed spread. Over the n seeds both sides have:

    mean = sum(d_s) / n,   sd = sqrt(sum((d_s - mean)^2) / (n - 1)),
    CI   = mean ± t_{0.975, n-1} · sd / sqrt(n)

where ``t_{q, k}`` is the q quantile of Student's t with k degrees of freedom. The verdict for a loss is
"better" when the whole interval is below 0, "worse" when it is above 0, and "cannot tell" when it
contains 0 (or when there are fewer than 2 pairs: no interval).

The t quantile is computed here (scipy is not a dependency): the t CDF through the regularized
incomplete beta function (continued fraction, Numerical Recipes 6.4) and bisection on it.

Example::

    >>> round(t_quantile(0.975, 2), 3)
    4.303
    >>> d = paired_difference({0: 3.10, 1: 3.12, 2: 3.11}, {0: 3.00, 1: 3.01, 2: 3.02})
    >>> round(d.mean, 3), d.verdict
    (0.1, 'worse')
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95
BETTER, WORSE, CANNOT_TELL = "better", "worse", "cannot tell"
_CF_ITERATIONS = 300
_CF_EPS = 1e-15


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz, Numerical Recipes 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, _CF_ITERATIONS + 1):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < _CF_EPS:
            break
    return result


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"regularized_beta: x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with k = ``dof`` degrees of freedom: 1 - I_{k/(k+t^2)}(k/2, 1/2) / 2."""
    if dof <= 0:
        raise ValueError(f"t_cdf: degrees of freedom must be positive, got {dof}")
    tail = 0.5 * regularized_beta(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, dof: float) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom (bisection on ``t_cdf``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}")
    if dof <= 0:
        raise ValueError(f"t_quantile: degrees of freedom must be positive, got {dof}")
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    low, high = 0.0, 1.0
    while t_cdf(high, dof) < p:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, dof) < p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of a_s - b_s over the seeds both sides have, its 95% t interval, and the verdict."""

    mean: float
    ci_low: float
    ci_high: float
    n: int
    verdict: str
    seeds: tuple[Any, ...] = ()

    @property
    def ci_text(self) -> str:
        return interval_text(self.mean, self.ci_low, self.ci_high, self.n)


def interval_text(mean: float, low: float, high: float, n: int) -> str:
    """``+0.1 [+0.0752, +0.125]``; ``-1 (n=1, no interval)`` without an interval; ``—`` when missing."""
    if math.isnan(mean):
        return "—"
    if math.isnan(low):
        return f"{mean:+.3g} (n={n}, no interval)"
    return f"{mean:+.3g} [{low:+.3g}, {high:+.3g}]"


def mean_ci(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high) of the t interval of the mean of ``values``; NaN bounds with fewer than 2."""
    values = np.asarray(values, dtype=float)
    if not len(values):
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    quantile = t_quantile(0.5 + confidence / 2.0, len(values) - 1)
    half = quantile * float(values.std(ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def interval_verdict(low: float, high: float, lower: str = BETTER, higher: str = WORSE) -> str:
    """``lower`` when the interval lies below 0, ``higher`` above 0, else "cannot tell"."""
    if math.isnan(low) or math.isnan(high):
        return CANNOT_TELL
    if high < 0:
        return lower
    if low > 0:
        return higher
    return CANNOT_TELL


def paired_difference(
    a: Mapping[Any, float], b: Mapping[Any, float], lower: str = BETTER, higher: str = WORSE
) -> PairedDifference:
    """Pair ``a`` and ``b`` (seed -> value) by seed, skipping NaN; the difference is a - b.

    With a loss, a - b < 0 means ``a`` is better: ``lower``/``higher`` name the two directions.
    """
    seeds = tuple(seed for seed in a if seed in b and not (math.isnan(a[seed]) or math.isnan(b[seed])))
    differences = np.array([a[seed] - b[seed] for seed in seeds], dtype=float)
    mean, low, high = mean_ci(differences)
    return PairedDifference(mean, low, high, len(seeds), interval_verdict(low, high, lower, higher), seeds)
