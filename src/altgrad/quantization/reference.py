"""The rounding of ``quantize`` on one Python float: a readable reference beside the vectorised kernels.

In the spirit of gfloat's ``round_float``: one value, one branch per rounding mode, exact arithmetic
on Python floats (binary64, every power-of-two scaling exact). It is what ``ops.quantize`` does at
scale 1, written as the specification; tests run it against the kernels on every code and on random
values of every format, and against ml_dtypes where it has the format. Not meant to be fast.

For ``y`` with binade ``e = floor(log2|y|)`` clamped to ``[emin, emax]`` the grid spacing is
``s = 2^(e - M)`` and::

    nearest       |y| -> s * round_half_even(|y| / s)                (M = 0: a tie goes to 2^(e+1))
    toward_zero   |y| -> s * floor(|y| / s)                           (finite overflow: max_finite)
    stochastic    |y| -> low + s if (t + random) >= 2^(P - M) else low,   low = s * floor(|y| / s)

where ``t`` is ``|y| - low`` in units of ``2^(e - P)`` (below the format's normal range first
rounded half-even to that resolution), ``random`` the integer in ``[0, 2^(P - M))`` the kernel drew
for this element and ``P`` the working float's mantissa width (23 for float32, 52 for float64).
A result above max_finite (or an infinite ``y``) follows ``overflow``: saturate to max_finite, inf,
or NaN. Then the format's edges: NaN stays NaN; a format without zero maps 0 to NaN and anything
smaller than its smallest value to that value; an unsigned format maps negative values to NaN;
the result takes y's sign, except that -0 becomes +0 where the format has no -0.

Example::

    >>> from altgrad.quantization.formats import E4M3
    >>> round_value(0.3, E4M3), round_value(-500.0, E4M3), round_value(0.3, E4M3, "toward_zero")
    (0.3125, -448.0, 0.28125)
"""

from __future__ import annotations

import math

from .formats import FloatFormat, get_format


def round_value(
    y: float,
    format: str | FloatFormat,
    rounding: str = "nearest",
    overflow: str = "saturate",
    random: int = 0,
    precision: int = 23,
) -> float:
    """``y`` rounded to ``fmt``'s grid (see the module docstring); ``random`` and ``precision`` (P)
    only matter for ``rounding="stochastic"``."""
    fmt = get_format(format)
    if math.isnan(y):
        return math.nan
    if not fmt.signed and y < 0:
        return math.nan
    if y == 0 and not fmt.has_zero:
        return math.nan
    magnitude = _round_magnitude(abs(y), fmt, rounding, random, precision)
    if magnitude > fmt.max_finite:
        magnitude = _overflow(magnitude, abs(y), fmt, rounding, overflow)
    if not fmt.has_zero and not math.isnan(magnitude):
        magnitude = max(magnitude, fmt.min_subnormal)
    if magnitude == 0 and not fmt.has_negative_zero:
        return 0.0
    return math.copysign(magnitude, y) if fmt.signed else magnitude


def _round_magnitude(a: float, fmt: FloatFormat, rounding: str, random: int, precision: int) -> float:
    """``a >= 0`` rounded on the format's grid continued past max_finite (inf for ``a >= 2^(emax+1)``)."""
    top = max(fmt.emax, fmt.emin)
    if a >= 2.0 ** (top + 1):
        return math.inf
    e = min(max(math.frexp(a)[1] - 1, fmt.emin), top) if a else fmt.emin
    M = fmt.mantissa_bits
    match rounding:
        case "nearest":
            return math.ldexp(round(math.ldexp(a, M - e)), e - M)  # round(): half to even, exact here
        case "toward_zero":
            return math.ldexp(math.floor(math.ldexp(a, M - e)), e - M)
        case "stochastic":
            if not 0 <= random < 1 << (precision - M):
                raise ValueError(f"random: must be in [0, 2^{precision - M}), got {random}")
            units = round(math.ldexp(a, precision - e))  # |y| in units of 2^(e - P), half to even
            low, t = divmod(units, 1 << (precision - M))
            return math.ldexp(low + (t + random >= 1 << (precision - M)), e - M)
    raise ValueError(f"rounding: {rounding!r} is not one of ('nearest', 'stochastic', 'toward_zero')")


def _overflow(magnitude: float, a: float, fmt: FloatFormat, rounding: str, overflow: str) -> float:
    """A rounded magnitude above max_finite under the overflow policy (IEEE 754: truncation keeps
    finite values finite)."""
    if overflow == "saturate" or (rounding == "toward_zero" and math.isfinite(a)):
        return fmt.max_finite
    if overflow == "inf":
        return math.inf
    if overflow == "nan":
        return math.nan
    raise ValueError(f"overflow: {overflow!r} is not one of ('saturate', 'inf', 'nan')")
