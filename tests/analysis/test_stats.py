"""t quantiles against published values and closed forms; paired intervals against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from altgrad.analysis.stats import (
    BETTER,
    CANNOT_TELL,
    WORSE,
    interval_verdict,
    mean_ci,
    paired_difference,
    t_cdf,
    t_quantile,
)

# Student's t quantiles as printed in standard tables (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2)
PUBLISHED = [
    (0.975, 1, 12.706),
    (0.975, 2, 4.303),
    (0.975, 3, 3.182),
    (0.975, 4, 2.776),
    (0.975, 5, 2.571),
    (0.975, 9, 2.262),
    (0.975, 10, 2.228),
    (0.975, 30, 2.042),
    (0.975, 100, 1.984),
    (0.95, 1, 6.314),
    (0.95, 5, 2.015),
    (0.995, 2, 9.925),
    (0.99, 20, 2.528),
]


@pytest.mark.parametrize(("p", "dof", "expected"), PUBLISHED)
def test_t_quantile_matches_published_tables(p, dof, expected):
    assert t_quantile(p, dof) == pytest.approx(expected, abs=5e-4)
    assert t_quantile(1 - p, dof) == pytest.approx(-expected, abs=5e-4)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.999])
def test_t_quantile_matches_closed_forms_for_one_and_two_dof(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))), rel=1e-9)


@pytest.mark.parametrize("dof", [3, 4, 7, 12])
def test_t_cdf_matches_numerical_integration_of_the_density(dof):
    x = np.linspace(0.0, 6.0, 600_001)
    density = np.exp(
        math.lgamma((dof + 1) / 2)
        - math.lgamma(dof / 2)
        - 0.5 * math.log(dof * math.pi)
        - (dof + 1) / 2 * np.log1p(x * x / dof)
    )
    cumulative = 0.5 + np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(x))])
    for t in (0.5, 1.0, 2.0, 3.5, 6.0):
        assert t_cdf(t, dof) == pytest.approx(cumulative[int(round(t * 100_000))], abs=1e-9)
        assert t_cdf(-t, dof) == pytest.approx(1 - cumulative[int(round(t * 100_000))], abs=1e-9)


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="p must be in"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.9, 0)


def test_paired_difference_by_hand():
    """d = (0.10, 0.11, 0.09): mean 0.1, sd 0.01, half width 4.303 x 0.01 / sqrt(3) = 0.02484."""
    a = {0: 3.10, 1: 3.12, 2: 3.11, 7: 9.0}
    b = {0: 3.00, 1: 3.01, 2: 3.02, 5: 1.0}
    d = paired_difference(a, b)
    assert d.n == 3 and d.seeds == (0, 1, 2)
    assert d.mean == pytest.approx(0.1)
    assert d.ci_low == pytest.approx(0.1 - 0.024841, abs=1e-5)
    assert d.ci_high == pytest.approx(0.1 + 0.024841, abs=1e-5)
    assert d.verdict == WORSE
    assert paired_difference(b, a).verdict == BETTER
    assert d.ci_text == "+0.1 [+0.0752, +0.125]"


def test_pairing_beats_the_unpaired_spread():
    """Seeds shift both sides alike: unpaired the means overlap, paired the difference is clear."""
    a = {0: 3.0, 1: 3.5, 2: 4.0}
    b = {0: 3.05, 1: 3.56, 2: 4.04}
    assert paired_difference(a, b).verdict == BETTER
    mean, low, high = mean_ci(np.array(list(a.values())))
    assert low < np.mean(list(b.values())) < high


def test_too_few_pairs_and_nan_give_no_interval():
    one = paired_difference({0: 1.0, 1: math.nan}, {0: 2.0, 1: 2.0})
    assert one.n == 1 and one.mean == -1.0 and math.isnan(one.ci_low) and one.verdict == CANNOT_TELL
    assert one.ci_text == "-1 (n=1, no interval)"
    none = paired_difference({0: 1.0}, {1: 1.0})
    assert none.n == 0 and math.isnan(none.mean) and none.verdict == CANNOT_TELL


def test_verdict_only_from_the_interval():
    assert interval_verdict(-0.2, -0.01) == BETTER
    assert interval_verdict(0.01, 0.2) == WORSE
    assert interval_verdict(-0.2, 0.01) == CANNOT_TELL
    assert interval_verdict(-0.2, 0.0) == CANNOT_TELL
    assert interval_verdict(0.1, 0.2, lower="lower", higher="higher") == "higher"
