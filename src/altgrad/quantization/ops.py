"""Fake quantization to any registered format: quantize, dequantize, encode, decode.

``quantize(x, fmt, scale)`` returns ``Q(x / scale) * scale`` in x's dtype, where ``Q`` rounds to the
format's grid. The arithmetic is float32 (float64 for float64 inputs, and for formats whose range
does not fit float32's, e.g. bfloat16 and E8M0), vectorized, with no host synchronisation.

Rounding (``rounding=``):

* ``"nearest"``: to the nearest grid value, ties to the even integral significand. For M >= 1 this
  is the even code (IEEE roundTiesToEven); for M = 0 formats (E7M0, E8M0) a tie between 2^e and
  2^(e+1) goes up, as in ml_dtypes and torch (gfloat picks the even code instead).
* ``"stochastic"``: up with probability (|y| - low) / (high - low), from ``generator``.
* ``"toward_zero"``: truncation.

The trick for "nearest" is one float add and subtract: with ``C = 2^(e - M + 23)`` for the
binade ``e`` of |y| (clamped to the format's exponent range), ``(|y| + C) - C`` is |y| rounded by the
FPU to a multiple of the format's spacing ``2^(e - M)``, ties to even, in a single rounding.

Overflow (``overflow=``), for magnitudes above max_finite after rounding and for +-inf inputs:
``"saturate"`` (default, +-max_finite), ``"inf"`` (formats with inf), ``"nan"`` (formats with NaN).
NaN in gives NaN out always. -0 keeps its sign where the format has -0 (not in fnuz formats).
A format without zero (E8M0) maps 0 to NaN and tiny values to its smallest value; an unsigned
format maps negative values to NaN (both as ml_dtypes does).

The gradient is straight-through; ``mask_saturated_grad=True`` zeroes it where |x / scale|
exceeded max_finite.

Example::

    >>> import torch
    >>> from altgrad.quantization import quantize, encode, decode, E4M3
    >>> x = torch.tensor([0.3, 500.0, -0.0])
    >>> quantize(x, E4M3)
    tensor([ 0.3125, 448.0000,  -0.0000])
    >>> decode(encode(x, E4M3), E4M3)
    tensor([ 0.3125, 448.0000,  -0.0000])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .formats import FloatFormat, get_format

Rounding = Literal["nearest", "stochastic", "toward_zero"]
Overflow = Literal["saturate", "inf", "nan"]
ROUNDING_MODES: tuple[str, ...] = ("nearest", "stochastic", "toward_zero")
OVERFLOW_POLICIES: tuple[str, ...] = ("saturate", "inf", "nan")
ScaleLike = float | torch.Tensor


@dataclass(frozen=True)
class _WorkingFloat:
    """The IEEE float the arithmetic runs in: its int view, mantissa width and exponent bias."""

    dtype: torch.dtype
    int_dtype: torch.dtype
    mantissa_bits: int
    bias: int


_FLOAT32 = _WorkingFloat(torch.float32, torch.int32, 23, 127)
_FLOAT64 = _WorkingFloat(torch.float64, torch.int64, 52, 1023)


def _working_float(fmt: FloatFormat, input_dtype: torch.dtype) -> _WorkingFloat:
    """float32 unless the input is float64 or the magic constants 2^(e - M + 23) leave float32's normal range."""
    if input_dtype == torch.float64:
        return _FLOAT64
    fits = fmt.mantissa_bits <= 22 and fmt.emin - fmt.mantissa_bits + 23 >= -126
    fits = fits and fmt.emax - fmt.mantissa_bits + 23 <= 127
    return _FLOAT32 if fits else _FLOAT64


def _check_options(fmt: FloatFormat, rounding: str, overflow: str | None) -> str:
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding: {rounding!r} is not one of {ROUNDING_MODES}")
    overflow = "saturate" if overflow is None else overflow
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow: {overflow!r} is not one of {OVERFLOW_POLICIES}")
    if overflow == "inf" and not fmt.has_inf:
        raise ValueError(f"overflow: 'inf' needs a format with inf; {fmt.name} has none (use 'saturate')")
    if overflow == "nan" and not fmt.has_nan:
        raise ValueError(f"overflow: 'nan' needs a format with NaN; {fmt.name} has none (use 'saturate')")
    return overflow


def _check_scale(scale: ScaleLike) -> None:
    """Scales must be finite and > 0. Tensor scales are checked on the CPU only (no device sync)."""
    if isinstance(scale, torch.Tensor):
        if scale.device.type == "cpu" and not bool(((scale > 0) & torch.isfinite(scale)).all()):
            bad = scale[~((scale > 0) & torch.isfinite(scale))].flatten()[:4].tolist()
            raise ValueError(f"scale: must be finite and > 0, got {bad}")
        return
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: must be finite and > 0, got {scale!r}")


def _round_magnitude(
    magnitude: torch.Tensor,
    fmt: FloatFormat,
    work: _WorkingFloat,
    rounding: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Round non-negative ``magnitude`` (any value, inf and NaN included) to the format's grid spacing.

    No range limit is applied here: values above max_finite come back above it.
    """
    shift = work.mantissa_bits - fmt.mantissa_bits
    exponent_mask = ((1 << (work.dtype.itemsize * 8 - 1 - work.mantissa_bits)) - 1) << work.mantissa_bits
    lowest = (fmt.emin + work.bias) << work.mantissa_bits
    highest = (fmt.emax + work.bias) << work.mantissa_bits
    # C = 2^(e - M + mantissa_bits) for the binade e of each element, clamped to [emin, emax].
    magic = (magnitude.view(work.int_dtype) & exponent_mask).clamp_(lowest, highest)
    magic = magic.add_(shift << work.mantissa_bits).view(work.dtype)
    if rounding == "nearest":
        return (magnitude + magic).sub_(magic)
    spacing = magic * 2.0**-work.mantissa_bits
    if rounding == "toward_zero":
        nearest = (magnitude + magic).sub_(magic)
        return torch.where(nearest > magnitude, nearest - spacing, nearest)
    units = magnitude / spacing  # exact: spacing is a power of two
    floor = torch.floor(units)
    draw = torch.rand(magnitude.shape, generator=generator, device=magnitude.device, dtype=work.dtype)
    return floor.add_(draw < units.sub_(floor)).mul_(spacing)


def _quantize_values(
    x: torch.Tensor,
    fmt: FloatFormat,
    scale: ScaleLike,
    rounding: str,
    overflow: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Q(x / scale) in the working float (not yet multiplied back by scale)."""
    work = _working_float(fmt, x.dtype)
    scaled = x.to(work.dtype)
    if not (isinstance(scale, (int, float)) and scale == 1):
        scaled = scaled / (scale.to(work.dtype) if isinstance(scale, torch.Tensor) else scale)
    magnitude = _round_magnitude(scaled.abs(), fmt, work, rounding, generator)
    if overflow == "saturate":
        magnitude = magnitude.clamp_(max=fmt.max_finite)  # clamp keeps NaN
    else:
        magnitude = magnitude.masked_fill_(magnitude > fmt.max_finite, math.inf if overflow == "inf" else math.nan)
    if not fmt.has_zero:  # nothing rounds to zero: the smallest value is the nearest; 0 itself is NaN
        magnitude = magnitude.clamp_(min=fmt.min_subnormal).masked_fill_(scaled == 0, math.nan)
    if not fmt.signed:
        return magnitude.masked_fill_(scaled < 0, math.nan)
    signed = torch.copysign(magnitude, scaled)
    if not fmt.has_negative_zero:
        signed = signed.add_(0.0)  # -0 + 0 = +0
    return signed


def _saturated(x: torch.Tensor, fmt: FloatFormat, scale: ScaleLike) -> torch.Tensor:
    return (x.abs() / scale) > fmt.max_finite


class _QuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fmt, scale, rounding, overflow, generator, mask_saturated_grad):  # type: ignore[override]
        values = _quantize_values(x, fmt, scale, rounding, overflow, generator)
        if not (isinstance(scale, (int, float)) and scale == 1):
            values = values * (scale.to(values.dtype) if isinstance(scale, torch.Tensor) else scale)
        ctx.mask = _saturated(x.detach(), fmt, scale) if mask_saturated_grad else None
        return values.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grad = grad_output if ctx.mask is None else grad_output.masked_fill(ctx.mask, 0.0)
        return grad, None, None, None, None, None, None


def quantize(
    x: torch.Tensor,
    format: str | FloatFormat,
    scale: ScaleLike = 1.0,
    rounding: Rounding = "nearest",
    overflow: Overflow | None = None,
    generator: torch.Generator | None = None,
    mask_saturated_grad: bool = False,
) -> torch.Tensor:
    """Fake-quantize: ``Q(x / scale) * scale`` in x's dtype, straight-through gradient.

    ``scale`` is a positive float or a tensor broadcastable to x (per-tensor or per-channel).
    """
    fmt = get_format(format)
    overflow = _check_options(fmt, rounding, overflow)
    _check_scale(scale)
    if not x.is_floating_point():
        raise ValueError(f"x: quantize needs a floating-point tensor, got {x.dtype}")
    return _QuantizeSTE.apply(x, fmt, scale, rounding, overflow, generator, mask_saturated_grad)


def encode(
    x: torch.Tensor,
    format: str | FloatFormat,
    scale: ScaleLike = 1.0,
    rounding: Rounding = "nearest",
    overflow: Overflow | None = None,
    generator: torch.Generator | None = None,
    check_nan: bool = True,
) -> torch.Tensor:
    """Integer codes of ``Q(x / scale)``: uint8 for formats of <= 8 bits, int32 above.

    ``decode(encode(x, f, s), f, s) == quantize(x, f, s)`` for finite x. NaN (in x, or produced by
    the overflow policy) raises ``ValueError`` for a format without a NaN code; ``check_nan=False``
    skips that check (it costs a host sync) and gives such elements an unspecified code.
    """
    fmt = get_format(format)
    overflow = _check_options(fmt, rounding, overflow)
    _check_scale(scale)
    with torch.no_grad():
        values = _quantize_values(x, fmt, scale, rounding, overflow, generator)
    if check_nan and not fmt.has_nan and bool(torch.isnan(values).any()):
        raise ValueError(f"x: NaN has no code in {fmt.name} (specials={fmt.specials!r})")
    return _codes_of_grid_values(values, fmt)


def _codes_of_grid_values(values: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Codes of values that already lie on the format's grid (or are +-inf / NaN)."""
    work = _FLOAT64 if values.dtype == torch.float64 else _FLOAT32
    M = fmt.mantissa_bits
    magnitude = values.abs()
    bits = magnitude.view(work.int_dtype)
    normal_code = (bits >> (work.mantissa_bits - M)) - (((work.bias - fmt.bias) << M))
    if fmt.has_zero:
        subnormal_code = (magnitude * 2.0 ** (M - fmt.emin)).to(work.int_dtype)
        normal_code = torch.where(magnitude < fmt.min_normal, subnormal_code, normal_code)
    if fmt.has_inf:
        normal_code = normal_code.masked_fill_(torch.isinf(magnitude), ((1 << fmt.exponent_bits) - 1) << M)
    codes = normal_code
    if fmt.signed:
        codes = codes | (torch.signbit(values).to(work.int_dtype) << (fmt.exponent_bits + M))
    if fmt.has_nan:
        codes = codes.masked_fill_(torch.isnan(values), fmt.encode(math.nan))
    return codes.to(torch.uint8 if fmt.total_bits <= 8 else torch.int32)


def decode(codes: torch.Tensor, format: str | FloatFormat, scale: ScaleLike = 1.0) -> torch.Tensor:
    """Float32 values of integer codes (a table lookup), multiplied by ``scale``."""
    fmt = get_format(format)
    _check_scale(scale)
    if codes.is_floating_point():
        raise ValueError(f"codes: expected an integer tensor, got {codes.dtype}")
    table = _decoded_table(fmt, codes.device)
    values = table[codes.to(torch.int64)]
    if not (isinstance(scale, (int, float)) and scale == 1):
        values = values * scale
    return values


_TABLES: dict[tuple[FloatFormat, torch.device], torch.Tensor] = {}


def _decoded_table(fmt: FloatFormat, device: torch.device) -> torch.Tensor:
    key = (fmt, torch.device(device))
    if key not in _TABLES:
        _TABLES[key] = fmt.values().to(device=device, dtype=torch.float32)
    return _TABLES[key]


def dequantize(codes: torch.Tensor, format: str | FloatFormat, scale: ScaleLike = 1.0) -> torch.Tensor:
    """Alias of ``decode``: codes back to real values at ``scale``."""
    return decode(codes, format, scale)
