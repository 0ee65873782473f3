"""Helpers the reference tests share: value comparison, custom format specs, gfloat's view of a format.

Importable from any test as ``from references import ...`` (``tests/`` is on pytest's pythonpath).
"""

from __future__ import annotations

import gfloat
import numpy as np
from gfloat.types import Domain

from altgrad.quantization.formats import FloatFormat

CUSTOM_SPECS = ["e3m4:bias=1", "e2m5:specials=ieee", "e4m3:specials=fnuz,bias=8", "e5m2:subnormals=false"]
"""Formats built from spec strings, checked alongside the registered ones."""


def same_values(got, expected) -> np.ndarray:
    """Element-wise: equal with the same sign of zero, or both NaN."""
    with np.errstate(invalid="ignore"):  # casting NaN of ml_dtypes types
        got = np.asarray(got, dtype=np.float64)
        expected = np.asarray(expected, dtype=np.float64)
    both_nan = np.isnan(got) & np.isnan(expected)
    return both_nan | ((got == expected) & (np.signbit(got) == np.signbit(expected)))


def gfloat_info(fmt: FloatFormat) -> gfloat.FormatInfo:
    """The gfloat description of one of our formats (gfloat's own vocabulary for the same layout)."""
    return gfloat.FormatInfo(
        fmt.name,
        k=fmt.total_bits,
        precision=fmt.mantissa_bits + 1,
        bias=fmt.bias,
        is_signed=fmt.signed,
        domain=Domain.Extended if fmt.specials == "ieee" else Domain.Finite,
        has_nz=fmt.specials != "fnuz" and fmt.signed,
        num_high_nans={"ieee": (1 << fmt.mantissa_bits) - 1, "fn": 1}.get(fmt.specials, 0),
        has_subnormals=fmt.subnormals,
        is_twos_complement=False,
    )
