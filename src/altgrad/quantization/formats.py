"""Small floating-point formats as data: bits, bias, special values, subnormals.

A format is a sign-magnitude binary float with ``exponent_bits`` (E) and ``mantissa_bits`` (M).
For exponent code ``e`` and mantissa code ``m``::

    normal     (e > 0, or any e when subnormals=False):  (1 + m / 2^M) * 2^(e - bias)
    subnormal  (e == 0 and subnormals=True):             (m / 2^M) * 2^(1 - bias)

Special values follow one of four policies:

* ``"ieee"``: the top exponent code holds +-inf (m == 0) and NaN (m != 0);
* ``"fn"``:   only the all-ones code (per sign) is NaN, there is no inf (OCP E4M3FN);
* ``"fnuz"``: NaN is the negative-zero code, no inf, no -0 (AMD/Graphcore formats);
* ``"none"``: every code is a finite number.

``subnormals=False`` means exponent code 0 is an ordinary normal binade, so the format has no zero
(this is how the unsigned MX scale format E8M0 works). ``signed=False`` drops the sign bit.

Example::

    >>> from altgrad.quantization.formats import E4M3, get_format
    >>> E4M3.max_finite, E4M3.min_subnormal
    (448.0, 0.001953125)
    >>> get_format("e3m4:bias=1").max_finite
    124.0
"""

from __future__ import annotations

import bisect
import functools
import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

SpecialValues = Literal["ieee", "fn", "fnuz", "none"]
SPECIAL_VALUE_POLICIES: tuple[str, ...] = ("ieee", "fn", "fnuz", "none")
MAX_TOTAL_BITS = 16


@dataclass(frozen=True)
class FloatFormat:
    """A sign-magnitude float format of at most 16 bits, described entirely by its fields."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    specials: SpecialValues = "none"
    subnormals: bool = True
    signed: bool = True

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: a format needs a non-empty name")
        for field in ("exponent_bits", "mantissa_bits", "bias"):
            if not isinstance(getattr(self, field), int) or isinstance(getattr(self, field), bool):
                raise ValueError(f"{field}: must be an int, got {getattr(self, field)!r}")
        if self.exponent_bits < 0:
            raise ValueError(f"exponent_bits: must be >= 0, got {self.exponent_bits}")
        if self.mantissa_bits < 0:
            raise ValueError(f"mantissa_bits: must be >= 0, got {self.mantissa_bits}")
        if self.exponent_bits + self.mantissa_bits < 1:
            raise ValueError("exponent_bits: exponent_bits + mantissa_bits must be at least 1")
        if self.total_bits > MAX_TOTAL_BITS:
            raise ValueError(
                f"exponent_bits: {self.total_bits} bits in all, at most {MAX_TOTAL_BITS} allowed"
            )
        if self.specials not in SPECIAL_VALUE_POLICIES:
            raise ValueError(f"specials: {self.specials!r} is not one of {SPECIAL_VALUE_POLICIES}")
        if self.specials == "ieee" and self.exponent_bits < 2:
            raise ValueError("specials: 'ieee' needs exponent_bits >= 2 (the top exponent code is inf/NaN)")
        if self.specials == "fnuz" and not self.signed:
            raise ValueError("specials: 'fnuz' needs a sign bit (NaN is the negative-zero code)")
        if not self.subnormals and self.exponent_bits == 0:
            raise ValueError("subnormals: a format with exponent_bits=0 is all subnormal (fixed point)")
        if self.max_finite <= 0:
            raise ValueError(f"specials: {self.name} would have no positive finite value")

    # ---- sizes and ranges ---------------------------------------------------------------------------

    @property
    def total_bits(self) -> int:
        return int(self.signed) + self.exponent_bits + self.mantissa_bits

    @property
    def num_codes(self) -> int:
        return 1 << self.total_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade (also of the subnormal spacing 2^(emin - M))."""
        return 1 - self.bias if self.subnormals else -self.bias

    @property
    def emax(self) -> int:
        """floor(log2(max_finite))."""
        return math.frexp(self.max_finite)[1] - 1

    @property
    def has_inf(self) -> bool:
        return self.specials == "ieee"

    @property
    def has_nan(self) -> bool:
        if self.specials == "ieee":
            return self.mantissa_bits > 0
        return self.specials in ("fn", "fnuz")

    @property
    def has_negative_zero(self) -> bool:
        return self.signed and self.has_zero and self.specials != "fnuz"

    @property
    def has_zero(self) -> bool:
        return self.subnormals

    @functools.cached_property
    def _positive_finite(self) -> list[float]:
        """Sorted distinct finite values >= 0."""
        return sorted({v for v in map(self.decode, range(self.num_codes)) if math.isfinite(v) and v >= 0})

    @property
    def max_finite(self) -> float:
        return self._positive_finite[-1]

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (equal to min_normal when there are no subnormal values)."""
        return next(v for v in self._positive_finite if v > 0)

    # ---- the decoded table ------------------------------------------------------------------------

    @functools.cache  # noqa: B019 - formats are few, immutable and live forever
    def values(self) -> torch.Tensor:
        """The decoded value of every code, ordered by code (float64; NaN and +-inf where specified)."""
        return torch.tensor([self.decode(code) for code in range(self.num_codes)], dtype=torch.float64)

    def decode(self, code: int) -> float:
        """The value of one integer code."""
        if not 0 <= code < self.num_codes:
            raise ValueError(f"code: {code} is outside 0..{self.num_codes - 1} for {self.name}")
        E, M = self.exponent_bits, self.mantissa_bits
        magnitude_bits = E + M
        negative = self.signed and bool(code >> magnitude_bits)
        magnitude = code & ((1 << magnitude_bits) - 1)
        exponent, mantissa = magnitude >> M, magnitude & ((1 << M) - 1)
        if self.specials == "ieee" and exponent == (1 << E) - 1:
            return math.nan if mantissa else (-math.inf if negative else math.inf)
        if self.specials == "fn" and magnitude == (1 << magnitude_bits) - 1:
            return math.nan
        if self.specials == "fnuz" and negative and magnitude == 0:
            return math.nan
        if exponent == 0 and self.subnormals:
            value = math.ldexp(mantissa, 1 - self.bias - M)
        else:
            value = math.ldexp((1 << M) + mantissa, exponent - self.bias - M)
        return -value if negative else value

    def encode(self, value: float) -> int:
        """The code of ``value`` rounded to nearest (ties to even significand), saturating overflow.

        NaN maps to the format's NaN code (``ValueError`` if it has none); +-inf to +-inf if the
        format has it, else to +-max_finite.
        """
        if math.isnan(value):
            if not self.has_nan:
                raise ValueError(f"value: NaN has no code in {self.name} (specials={self.specials!r})")
            return self._nan_code
        negative = math.copysign(1.0, value) < 0
        if negative and not self.signed:
            raise ValueError(f"value: {value} is negative and {self.name} is unsigned")
        magnitude = abs(value)
        if math.isinf(magnitude) and self.has_inf:
            return self._code_of(math.inf, negative)
        grid = self._positive_finite
        if magnitude >= grid[-1]:
            return self._code_of(grid[-1], negative)
        above = bisect.bisect_left(grid, magnitude)
        if grid[above] == magnitude:
            return self._code_of(magnitude, negative)
        if above == 0:  # below the smallest value of a format without zero
            return self._code_of(grid[0], negative)
        low, high = grid[above - 1], grid[above]
        if magnitude - low != high - magnitude:
            nearest = low if magnitude - low < high - magnitude else high
        else:  # a tie: the neighbour whose significand, in units of the spacing, is even
            nearest = low if (low / (high - low)) % 2 == 0 else high
        return self._code_of(nearest, negative)

    @functools.cached_property
    def _code_by_value(self) -> dict[tuple[float, bool], int]:
        codes: dict[tuple[float, bool], int] = {}
        for code in range(self.num_codes):
            value = self.decode(code)
            if not math.isnan(value):
                codes.setdefault((abs(value), math.copysign(1.0, value) < 0), code)
        return codes

    def _code_of(self, magnitude: float, negative: bool) -> int:
        if magnitude == 0 and negative and not self.has_negative_zero:
            negative = False
        return self._code_by_value[(magnitude, negative)]

    @functools.cached_property
    def _nan_code(self) -> int:
        return next(code for code in range(self.num_codes) if math.isnan(self.decode(code)))

    # ---- the original AltGrad's names (docs/compat.md) ----------------------------------------------

    @property
    def max_representable_value(self) -> float:
        """``max_finite`` under the original AltGrad's name (E4M3: 448, the OCP value)."""
        return self.max_finite

    def to_real(self, bit_index: int) -> float:
        """``decode`` under the original AltGrad's name: the value of one code."""
        return self.decode(bit_index)

    def to_bits(self, value: float) -> int:
        """``encode`` under the original AltGrad's name: nearest code, ties to even, saturating; NaN
        gives the NaN code, and ``ValueError`` in a format without one (never the code of 0)."""
        return self.encode(value)

    def describe(self) -> dict[str, object]:
        """One row of the formats table."""
        return {
            "name": self.name,
            "E": self.exponent_bits,
            "M": self.mantissa_bits,
            "bias": self.bias if self.exponent_bits > 0 else "-",
            "specials": self.specials,
            "min_subnormal": self.min_subnormal if self.subnormals and self.mantissa_bits else "-",
            "min_normal": self.min_normal if self.exponent_bits > 0 else "-",
            "max": self.max_finite,
        }


FP8Format = FloatFormat  # the name the rest of altgrad imports; formats of up to 16 bits share it

# ---- the eight E/M splits of an 8-bit float ------------------------------------------------------------

E0M7 = FloatFormat("E0M7", 0, 7, bias=1)
"""Fixed point k/128 with |k| <= 127: the bias only fixes the subnormal scale 2^(1-bias) = 1."""
E1M6 = FloatFormat("E1M6", 1, 6, bias=0)
"""With subnormals the binades [0, 2) and [2, 4) share the spacing 1/32: a uniform grid like E0M7."""
E2M5 = FloatFormat("E2M5", 2, 5, bias=1)
E3M4 = FloatFormat("E3M4", 3, 4, bias=3)
"""Every code finite, max 31."""
E4M3 = FloatFormat("E4M3", 4, 3, bias=7, specials="fn")
"""OCP E4M3FN, identical to torch.float8_e4m3fn: max 448, NaN at 0x7F/0xFF, no inf."""
E5M2 = FloatFormat("E5M2", 5, 2, bias=15, specials="ieee")
"""OCP E5M2, identical to torch.float8_e5m2: max 57344, IEEE inf/NaN."""
E6M1 = FloatFormat("E6M1", 6, 1, bias=31)
E7M0 = FloatFormat("E7M0", 7, 0, bias=63)
"""Powers of two 2^-62 .. 2^64 and zero (exponent code 0)."""

# ---- standard formats under the names ml_dtypes uses ------------------------------------------------------

FLOAT8_E4M3FN = FloatFormat("float8_e4m3fn", 4, 3, bias=7, specials="fn")
FLOAT8_E5M2 = FloatFormat("float8_e5m2", 5, 2, bias=15, specials="ieee")
FLOAT8_E4M3 = FloatFormat("float8_e4m3", 4, 3, bias=7, specials="ieee")
FLOAT8_E3M4 = FloatFormat("float8_e3m4", 3, 4, bias=3, specials="ieee")
FLOAT8_E4M3FNUZ = FloatFormat("float8_e4m3fnuz", 4, 3, bias=8, specials="fnuz")
FLOAT8_E5M2FNUZ = FloatFormat("float8_e5m2fnuz", 5, 2, bias=16, specials="fnuz")
FLOAT8_E4M3B11FNUZ = FloatFormat("float8_e4m3b11fnuz", 4, 3, bias=11, specials="fnuz")
FLOAT6_E2M3FN = FloatFormat("float6_e2m3fn", 2, 3, bias=1)
FLOAT6_E3M2FN = FloatFormat("float6_e3m2fn", 3, 2, bias=3)
FLOAT4_E2M1FN = FloatFormat("float4_e2m1fn", 2, 1, bias=1)
FLOAT8_E8M0FNU = FloatFormat("float8_e8m0fnu", 8, 0, bias=127, specials="fn", subnormals=False, signed=False)
"""Unsigned power-of-two scale of the OCP MX formats: 2^-127 .. 2^127, NaN at 0xFF, no zero."""
FLOAT16 = FloatFormat("float16", 5, 10, bias=15, specials="ieee")
BFLOAT16 = FloatFormat("bfloat16", 8, 7, bias=127, specials="ieee")

FORMATS: dict[str, FloatFormat] = {
    fmt.name: fmt
    for fmt in (
        E0M7, E1M6, E2M5, E3M4, E4M3, E5M2, E6M1, E7M0,
        FLOAT8_E4M3FN, FLOAT8_E5M2, FLOAT8_E4M3, FLOAT8_E3M4, FLOAT8_E4M3FNUZ, FLOAT8_E5M2FNUZ,
        FLOAT8_E4M3B11FNUZ, FLOAT6_E2M3FN, FLOAT6_E3M2FN, FLOAT4_E2M1FN, FLOAT8_E8M0FNU,
        FLOAT16, BFLOAT16,
    )
}  # fmt: skip
"""Every registered format by name (look names up with ``get_format``, which ignores case)."""

_CUSTOM_SPEC = re.compile(r"^e(\d+)m(\d+)(?::(.*))?$", re.IGNORECASE)
_CUSTOM_KEYS = ("bias", "specials", "subnormals", "signed")


def _parse_custom(spec: str) -> FloatFormat:
    match = _CUSTOM_SPEC.match(spec.strip())
    assert match is not None
    exponent_bits, mantissa_bits = int(match.group(1)), int(match.group(2))
    options: dict[str, object] = {
        "bias": (1 << (exponent_bits - 1)) - 1 if exponent_bits > 0 else 1,
        "specials": "none",
        "subnormals": True,
        "signed": True,
    }
    for item in filter(None, (match.group(3) or "").split(",")):
        key, _, raw = item.partition("=")
        key = key.strip().lower()
        if key not in _CUSTOM_KEYS or not raw:
            allowed = ", ".join(_CUSTOM_KEYS)
            raise ValueError(f"format spec {spec!r}: unknown option {item!r}; allowed: {allowed}")
        raw = raw.strip()
        if key == "bias":
            try:
                options[key] = int(raw)
            except ValueError:
                raise ValueError(f"format spec {spec!r}: bias must be an int, got {raw!r}") from None
        elif key == "specials":
            options[key] = raw.lower()
        else:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"format spec {spec!r}: {key} must be true or false, got {raw!r}")
            options[key] = raw.lower() in ("true", "1")
    canonical = f"E{exponent_bits}M{mantissa_bits}" + (f":{match.group(3)}" if match.group(3) else "")
    try:
        return FloatFormat(canonical, exponent_bits, mantissa_bits, **options)  # type: ignore[arg-type]
    except ValueError as error:
        raise ValueError(f"format spec {spec!r}: {error}; known formats: {', '.join(FORMATS)}") from None


TORCH_DTYPE_FORMATS: dict[torch.dtype, FloatFormat] = {
    getattr(torch, fmt.name): fmt
    for fmt in (FLOAT8_E4M3FN, FLOAT8_E5M2, FLOAT8_E4M3FNUZ, FLOAT8_E5M2FNUZ, FLOAT8_E8M0FNU)
    + (FLOAT16, BFLOAT16)
    if hasattr(torch, fmt.name)
}
"""The torch dtypes with an altgrad format of the same name (the fnuz and e8m0 ones if torch has them)."""


def get_format(name: str | FloatFormat | torch.dtype) -> FloatFormat:
    """Look a format up by name, case-insensitively, or build one from a spec like ``"e3m4:bias=1"``.

    Spec options: ``bias`` (default 2^(E-1) - 1), ``specials`` (default none), ``subnormals``,
    ``signed``. A ``FloatFormat`` passes through unchanged; a torch dtype (``torch.float8_e4m3fn``,
    ``torch.bfloat16``, ...) or its name with the ``torch.`` prefix gives the format of that name.
    """
    if isinstance(name, FloatFormat):
        return name
    if isinstance(name, torch.dtype):
        if name not in TORCH_DTYPE_FORMATS:
            known = ", ".join(str(dtype) for dtype in TORCH_DTYPE_FORMATS)
            raise ValueError(f"format: {name} has no altgrad format (full precision is 'none'); has: {known}")
        return TORCH_DTYPE_FORMATS[name]
    if not isinstance(name, str):
        raise ValueError(f"format: expected a name, FloatFormat or torch dtype, got {type(name).__name__}")
    by_lower = {key.lower(): fmt for key, fmt in FORMATS.items()}
    found = by_lower.get(name.strip().lower().removeprefix("torch."))
    if found is not None:
        return found
    if _CUSTOM_SPEC.match(name.strip()):
        return _parse_custom(name)
    raise ValueError(
        f"unknown format {name!r}; known formats: {', '.join(FORMATS)} (or a spec such as 'e3m4:bias=1')"
    )


NO_FORMAT_NAMES: tuple[str, ...] = ("none", "fp32", "")
"""The names of "no format" (full precision), compared stripped and lower-case; ``None`` means it too."""


def parse_format(name: str | FloatFormat | torch.dtype | None) -> FloatFormat | None:
    """The format ``name`` names, or None for full precision: ``None`` or a name in ``NO_FORMAT_NAMES``
    (``"none"``, ``"fp32"``, ``""``; any case, surrounding spaces ignored). Everything else goes to
    ``get_format`` (an unknown name is its one-line error). The one parser of "no format".

    Example::

        >>> parse_format(" FP32 ") is None, parse_format("e4m3") is E4M3
        (True, True)
    """
    if name is None or (isinstance(name, str) and name.strip().lower() in NO_FORMAT_NAMES):
        return None
    return get_format(name)


def format_name(fmt: FloatFormat | None) -> str:
    """``fmt.name``, or ``"none"`` for full precision (what ``parse_format`` reads back)."""
    return "none" if fmt is None else fmt.name


@functools.cache
def grid_key(fmt: FloatFormat) -> tuple:
    """What ``fmt`` rounds to, up to a power-of-two factor: its finite values times ``2^-emax`` (sorted),
    and whether it has inf, NaN and -0.

    Two formats have equal keys exactly when one's values are the other's times ``2^k`` with the same
    special values: E1M6 and E0M7 (the uniform grid of 128 magnitudes), ``float8_e4m3fn`` and E4M3,
    E4M3 at bias 7 and at bias 8. At scales ``2^k`` apart they quantize every tensor to the same
    numbers and the same grid positions; every altgrad scaling mode sets the scale from the amax
    relative to the format's range (``amax / max_finite``, or ``2^(floor(log2 amax) - emax)`` per MX
    block) and so picks scales exactly ``2^k`` apart (see ``same_grid``).
    """
    values = fmt.values()
    finite = values[torch.isfinite(values)]
    normalized = torch.unique(torch.ldexp(finite, torch.tensor(-fmt.emax, dtype=torch.int64)))
    return (tuple(normalized.tolist()), fmt.has_inf, fmt.has_nan, fmt.has_negative_zero)


def same_grid(a: str | FloatFormat | None, b: str | FloatFormat | None) -> bool:
    """Whether two formats (or names; ``"none"`` and the like are full precision) are the same grid up
    to a power-of-two factor, the one rule for equivalent formats (``grid_key``). Full precision is the
    same grid only as full precision.

    Example::

        >>> same_grid("E1M6", "E0M7"), same_grid("E4M3", "float8_e4m3fn"), same_grid("E4M3", "E3M4")
        (True, True, False)
    """
    fmt_a, fmt_b = parse_format(a), parse_format(b)
    if fmt_a is None or fmt_b is None:
        return fmt_a is fmt_b
    return fmt_a == fmt_b or grid_key(fmt_a) == grid_key(fmt_b)


def __getattr__(name: str) -> object:
    """The original AltGrad's names at the import path it used, defined in ``compat``
    (docs/compat.md): ``FORMAT_REGISTRY``."""
    if name in ("FORMAT_REGISTRY",):
        from altgrad.quantization import compat

        return getattr(compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
