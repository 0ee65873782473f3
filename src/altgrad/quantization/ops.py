"""Fake quantization to any registered format: quantize, dequantize, encode, decode.

``quantize(x, fmt, scale)`` returns ``Q(x / scale) * scale`` in x's dtype, where ``Q`` rounds to the
format's grid and ``x / scale`` is evaluated in the working float. The arithmetic is float32 (float64
for float64 inputs, and for formats whose range does not fit float32's, e.g. bfloat16 and E8M0),
vectorized, with no host synchronisation. On the CPU, large tensors are processed in cache-sized
chunks written into one preallocated output.

Rounding (``rounding=``):

* ``"nearest"``: to the nearest grid value, ties to the even integral significand. For M >= 1 this
  is the even code (IEEE roundTiesToEven); for M = 0 formats (E7M0, E8M0) a tie between 2^e and
  2^(e+1) goes up, as in ml_dtypes and torch (gfloat picks the even code instead).
* ``"stochastic"``: up (away from zero) with probability (|y| - low) / (high - low), resolved to
  2^-(P - M) where P is the working float's mantissa width (23 or 52) -- exact for every input in
  the format's normal range. The random bits come from a counter-based hash keyed by two numbers
  drawn from ``generator`` (or the default generator of x's device): the same generator state gives
  the same result, on any device and for any chunking.
* ``"toward_zero"``: truncation. As in IEEE 754, a finite value never rounds to +-inf or NaN this
  way: finite overflow gives +-max_finite whatever the overflow policy.

The trick for "nearest" is one float add and subtract: with ``C = 2^(e - M + P)`` for the binade
``e`` of |y| (clamped to the format's exponent range), ``(|y| + C) - C`` is |y| rounded by the FPU to
a multiple of the format's spacing ``2^(e - M)``, ties to even, in a single rounding. "stochastic"
scales y by ``2^k`` so that the format's smallest normal binade lands on the working float's, where
the working float's own subnormals reproduce the format's; adding a random integer below
``2^(P - M)`` to the bit pattern and clearing those low bits is then stochastic rounding everywhere.

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

import functools
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

CHUNK_BYTES = 1 << 19
"""Bytes of working float per CPU chunk: small enough that a chunk and its scratch stay in L2."""


@dataclass(frozen=True)
class _WorkingFloat:
    """The IEEE float the arithmetic runs in: its int view, mantissa width and exponent bias."""

    dtype: torch.dtype
    int_dtype: torch.dtype
    mantissa_bits: int
    bias: int

    @property
    def bits(self) -> int:
        return self.dtype.itemsize * 8

    @property
    def emin(self) -> int:
        return 1 - self.bias


_FLOAT32 = _WorkingFloat(torch.float32, torch.int32, 23, 127)
_FLOAT64 = _WorkingFloat(torch.float64, torch.int64, 52, 1023)


def _fits(fmt: FloatFormat, work: _WorkingFloat) -> bool:
    """Whether the kernels' constants (2^emin .. 2^(emax + P - M), spacings, 2^k) are normal in ``work``."""
    top = max(fmt.emax, fmt.emin)
    return (
        fmt.mantissa_bits <= work.mantissa_bits - 1
        and fmt.emin - fmt.mantissa_bits >= work.emin
        and top + work.mantissa_bits - fmt.mantissa_bits + 1 <= work.bias
    )


def _working_float(fmt: FloatFormat, input_dtype: torch.dtype) -> _WorkingFloat:
    """float32 unless the input is float64 or the format's constants leave float32's normal range."""
    if input_dtype == torch.float64 or not _fits(fmt, _FLOAT32):
        return _FLOAT64
    return _FLOAT32


def _signed(value: int, bits: int) -> int:
    """The two's-complement reading of the low ``bits`` bits of ``value``."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


@dataclass(frozen=True)
class _Plan:
    """Constants of the kernels for one format in one working float."""

    work: _WorkingFloat
    exponent_mask: int  # the exponent field of the working float
    lowest: int  # bits of 2^emin
    highest: int  # bits of 2^max(emax, emin)
    alpha: float  # 2^(P - M): C = alpha * 2^e
    spacing_offset: int  # M << P: subtracting it from the bits of 2^e gives 2^(e - M)
    k: int  # stochastic: y * 2^k puts the format's emin on the working float's emin
    random_bits: int  # P - M
    keep_mask: int  # ~(2^(P - M) - 1), sign bit included
    max_finite: float
    overflow_limit: float  # 2^(emax + 1): a finite stand-in for inf that still overflows


@functools.cache
def _plan(fmt: FloatFormat, work: _WorkingFloat) -> _Plan:
    P, M = work.mantissa_bits, fmt.mantissa_bits
    top = max(fmt.emax, fmt.emin)
    return _Plan(
        work=work,
        exponent_mask=((1 << (work.bits - 1 - P)) - 1) << P,
        lowest=(fmt.emin + work.bias) << P,
        highest=(top + work.bias) << P,
        alpha=2.0 ** (P - M),
        spacing_offset=M << P,
        k=work.emin - fmt.emin,
        random_bits=P - M,
        keep_mask=_signed(~((1 << (P - M)) - 1), work.bits),
        max_finite=fmt.max_finite,
        overflow_limit=2.0 ** (top + 1),
    )


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


def _check_scale(scale: ScaleLike, shape: torch.Size | None = None) -> None:
    """Scales must be finite and > 0. Tensor scales are checked on the CPU only (no device sync)."""
    if isinstance(scale, torch.Tensor):
        if not scale.is_floating_point():
            raise ValueError(f"scale: expected a floating-point tensor, got {scale.dtype}")
        if shape is not None:
            try:
                broadcast = torch.broadcast_shapes(shape, scale.shape)
            except RuntimeError:
                broadcast = None
            if broadcast != shape:
                raise ValueError(
                    f"scale: shape {tuple(scale.shape)} does not broadcast to x's shape {tuple(shape)}"
                )
        if scale.device.type == "cpu" and not bool(((scale > 0) & torch.isfinite(scale)).all()):
            bad = scale[~((scale > 0) & torch.isfinite(scale))].flatten()[:4].tolist()
            raise ValueError(f"scale: must be finite and > 0, got {bad}")
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale: must be a positive float or a tensor, got {scale!r}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: must be finite and > 0, got {scale!r}")


# ---- random bits -------------------------------------------------------------------------------------

_GOLDEN = {32: 0x9E3779B9, 64: 0x9E3779B97F4A7C15}
_COUNTERS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _counter_base(device: torch.device, int_dtype: torch.dtype, n: int) -> torch.Tensor:
    """``arange(n) * golden`` in the word size (wrapping); cached for the CPU chunk length."""
    bits = int_dtype.itemsize * 8
    key = (torch.device(device), int_dtype)
    cached = _COUNTERS.get(key)
    if cached is not None and cached.numel() >= n:
        return cached[:n]
    base = torch.arange(n, device=device, dtype=int_dtype).mul_(_signed(_GOLDEN[bits], bits))
    if device.type == "cpu":
        _COUNTERS[key] = base
    return base


def _draw_keys(generator: torch.Generator | None, device: torch.device, bits: int) -> tuple:
    """Offset and odd multiplier of the hash: Python ints when drawn on the CPU, 0-dim tensors otherwise."""
    draw_device = generator.device if generator is not None else device
    words = torch.randint(0, 1 << 32, (4,), dtype=torch.int64, generator=generator, device=draw_device)
    if draw_device.type == "cpu":
        w = words.tolist()
        offset, multiplier = w[0] | (w[1] << 32), w[2] | (w[3] << 32) | 1
        return _signed(offset, bits), _signed(multiplier, bits)
    if bits == 32:
        offset, multiplier = words[0], words[2] | 1
    else:
        offset, multiplier = words[0] | (words[1] << 32), words[2] | (words[3] << 32) | 1
    int_dtype = torch.int32 if bits == 32 else torch.int64
    # int64 -> int32 keeps the low 32 bits (two's complement wrap).
    return offset.to(device=device, dtype=int_dtype), multiplier.to(device=device, dtype=int_dtype)


def _random_ints(out: torch.Tensor, tmp: torch.Tensor, start: int, keys: tuple, plan: _Plan) -> torch.Tensor:
    """Uniform integers in [0, 2^(P - M)) for elements start .. start + len(out), into ``out``.

    h = index * golden + offset (a Weyl sequence), h ^= h >> w/2, h *= odd multiplier, then the top
    P - M bits: multiply-shift hashing with a random odd multiplier.
    """
    bits = plan.work.bits
    n = out.numel()
    offset, multiplier = keys
    base = _counter_base(out.device, out.dtype, n)
    if isinstance(offset, int):
        torch.add(base, _signed(offset + start * _GOLDEN[bits], bits), out=out)
    else:  # device keys: one chunk only, start == 0
        torch.add(base, offset, out=out)
    torch.bitwise_right_shift(out, bits // 2, out=tmp)
    out.bitwise_xor_(tmp)
    out.mul_(multiplier)
    out.bitwise_right_shift_(bits - plan.random_bits)
    return out.bitwise_and_((1 << plan.random_bits) - 1)


# ---- the kernels ---------------------------------------------------------------------------------------


def _load_scaled(dst: torch.Tensor, src: torch.Tensor, divisor: float | torch.Tensor | None) -> torch.Tensor:
    """dst = src / divisor in the working float."""
    if divisor is None:
        return dst.copy_(src)
    if src.dtype == dst.dtype:
        return torch.div(src, divisor, out=dst)
    return dst.copy_(src).div_(divisor)


def _finish_sign(a: torch.Tensor, src: torch.Tensor, fmt: FloatFormat, zero: torch.Tensor | None) -> None:
    """Format-specific fix-ups of the non-negative magnitude ``a``, then the sign of ``src``."""
    if not fmt.has_zero:  # nothing rounds to zero: the smallest value is the nearest; 0 itself is NaN
        a.clamp_(min=fmt.min_subnormal)
        if zero is not None:
            a.masked_fill_(zero, math.nan)
    if not fmt.signed:
        a.masked_fill_(src < 0, math.nan)
        return
    torch.copysign(a, src, out=a)
    if not fmt.has_negative_zero:
        a.add_(0.0)  # -0 + 0 = +0


def _nearest_kernel(src, a, scratch, fmt, plan, overflow, scale, multiply_back) -> None:
    if scale is None and src.dtype == a.dtype:
        torch.abs(src, out=a)
    else:
        _load_scaled(a, src, scale).abs_()
    zero = (src == 0) if not fmt.has_zero else None
    exponent = torch.bitwise_and(a.view(scratch.dtype), plan.exponent_mask, out=scratch)
    power = exponent.clamp_(plan.lowest, plan.highest).view(a.dtype)  # 2^e, e clamped to [emin, emax]
    a.add_(power, alpha=plan.alpha).sub_(power, alpha=plan.alpha)
    if overflow == "saturate":
        a.clamp_(max=plan.max_finite)  # keeps NaN
    else:
        a.masked_fill_(a > plan.max_finite, math.inf if overflow == "inf" else math.nan)
    _finish_sign(a, src, fmt, zero)
    if multiply_back and scale is not None:
        a.mul_(scale)


def _toward_zero_kernel(src, a, scratch, fmt, plan, overflow, scale, multiply_back) -> None:
    _load_scaled(a, src, scale).abs_()
    zero = (src == 0) if not fmt.has_zero else None
    a.clamp_(max=plan.max_finite)  # finite overflow truncates to max_finite (IEEE 754)
    exponent = torch.bitwise_and(a.view(scratch.dtype), plan.exponent_mask, out=scratch)
    spacing = exponent.clamp_(plan.lowest, plan.highest).sub_(plan.spacing_offset).view(a.dtype)
    a.div_(spacing).floor_().mul_(spacing)  # exact: the spacing is a power of two
    if overflow != "saturate":
        a.masked_fill_(torch.isinf(src), math.inf if overflow == "inf" else math.nan)
    _finish_sign(a, src, fmt, zero)
    if multiply_back and scale is not None:
        a.mul_(scale)


def _stochastic_kernel(src, a, scratch, fmt, plan, overflow, scale, multiply_back, r) -> None:
    """``r``: the random integers in [0, 2^(P - M)); y = (src / scale) * 2^k goes to ``scratch``."""
    y = scratch.view(a.dtype)
    up, down = 2.0**plan.k, 2.0**-plan.k
    fused = _fused_divisor(scale, plan.k, a.dtype) if isinstance(scale, float) else None
    if fused is not None:  # x / (scale * 2^-k) == (x / scale) * 2^k exactly
        _load_scaled(y, src, fused)
    elif scale is None and plan.k and src.dtype == y.dtype:
        torch.mul(src, up, out=y)
    else:
        _load_scaled(y, src, scale)
        if plan.k:
            y.mul_(up)
    limit = (plan.max_finite if overflow == "saturate" else plan.overflow_limit) * up
    y.clamp_(-limit, limit)  # keeps NaN (its bits are restored below)
    a_bits = a.view(scratch.dtype)
    torch.add(scratch, r, out=a_bits).bitwise_and_(plan.keep_mask)
    a.add_(y, alpha=0.0)  # NaN in y -> NaN; 0 * y is a zero of y's sign, so -0 stays -0
    if overflow != "saturate":
        a.masked_fill_(a.abs() > plan.max_finite * up, math.inf if overflow == "inf" else math.nan)
        torch.copysign(a, y, out=a)
    if not fmt.has_zero or not fmt.signed:
        zero = (src == 0) if not fmt.has_zero else None
        a.abs_()
        if not fmt.has_zero:
            a.clamp_(min=fmt.min_subnormal * up)
            if zero is not None:
                a.masked_fill_(zero, math.nan)
        if fmt.signed:
            torch.copysign(a, y, out=a)
        else:
            a.masked_fill_(y < 0, math.nan)
    if fmt.signed and not fmt.has_negative_zero:
        a.add_(0.0)
    if multiply_back and scale is not None:
        if fused is not None:
            a.mul_(fused)  # (a * 2^-k) * scale in one rounding
            return
        if plan.k:
            a.mul_(down)
        a.mul_(scale)
    elif plan.k:
        a.mul_(down)


def _fused_divisor(scale: float, k: int, dtype: torch.dtype) -> float | None:
    """``scale`` (rounded to ``dtype``) times 2^-k when that is a normal number of ``dtype``."""
    rounded = float(torch.tensor(scale, dtype=dtype))
    value = rounded * 2.0**-k
    info = torch.finfo(dtype)
    return value if info.tiny <= value <= info.max else None


def _fake_quantize(
    x: torch.Tensor,
    fmt: FloatFormat,
    scale: ScaleLike,
    rounding: str,
    overflow: str,
    generator: torch.Generator | None,
    multiply_back: bool,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``Q(x / scale)``, times ``scale`` if ``multiply_back``, in ``out_dtype`` (default: working float)."""
    work = _working_float(fmt, x.dtype)
    plan = _plan(fmt, work)
    out_dtype = work.dtype if out_dtype is None else out_dtype
    if isinstance(scale, torch.Tensor):
        if scale.numel() == 1:
            scale = scale.reshape(()).to(device=x.device, dtype=work.dtype)
        else:  # per-channel: divide up front, quantize at scale 1, multiply back
            channel_scale = scale.to(device=x.device, dtype=work.dtype)
            y = x.detach().to(work.dtype) / channel_scale
            values = _fake_quantize(y, fmt, 1.0, rounding, overflow, generator, False)
            if multiply_back:
                values.mul_(channel_scale)
            return values.to(out_dtype)
    elif scale == 1:
        scale = None
    else:
        scale = float(scale)

    src = x.detach().contiguous().view(-1)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    flat_out = out.view(-1)
    n = src.numel()
    if n == 0:
        return out
    chunk = n if x.device.type != "cpu" else min(n, max(1, CHUNK_BYTES // work.dtype.itemsize))
    direct = out_dtype == work.dtype
    scratch = torch.empty(chunk, dtype=work.int_dtype, device=x.device)
    buffer = None if direct else torch.empty(chunk, dtype=work.dtype, device=x.device)
    keys = random_buf = None
    if rounding == "stochastic":
        keys = _draw_keys(generator, x.device, work.bits)
        random_buf = torch.empty(chunk, dtype=work.int_dtype, device=x.device)

    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        m = stop - start
        piece, tmp = src[start:stop], scratch[:m]
        dst = flat_out[start:stop] if direct else buffer[:m]
        if rounding == "nearest":
            _nearest_kernel(piece, dst, tmp, fmt, plan, overflow, scale, multiply_back)
        elif rounding == "toward_zero":
            _toward_zero_kernel(piece, dst, tmp, fmt, plan, overflow, scale, multiply_back)
        else:
            randoms = _random_ints(random_buf[:m], tmp, start, keys, plan)
            _stochastic_kernel(piece, dst, tmp, fmt, plan, overflow, scale, multiply_back, randoms)
        if not direct:
            flat_out[start:stop].copy_(dst)
    return out


def _quantize_values(
    x: torch.Tensor,
    fmt: FloatFormat,
    scale: ScaleLike,
    rounding: str,
    overflow: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Q(x / scale) in the working float (not multiplied back by scale)."""
    return _fake_quantize(x, fmt, scale, rounding, overflow, generator, multiply_back=False)


def _saturated(x: torch.Tensor, fmt: FloatFormat, scale: ScaleLike) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        scale = scale.to(device=x.device)
    return (x.abs() / scale) > fmt.max_finite


class _QuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fmt, scale, rounding, overflow, generator, mask_saturated_grad):  # type: ignore[override]
        values = _fake_quantize(x, fmt, scale, rounding, overflow, generator, True, x.dtype)
        ctx.mask = _saturated(x.detach(), fmt, scale) if mask_saturated_grad else None
        return values

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
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x: quantize needs a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    _check_scale(scale, x.shape)
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
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x: encode needs a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    _check_scale(scale, x.shape)
    with torch.no_grad():
        values = _quantize_values(x.detach(), fmt, scale, rounding, overflow, generator)
    if check_nan and not fmt.has_nan and bool(torch.isnan(values).any()):
        raise ValueError(f"x: NaN has no code in {fmt.name} (specials={fmt.specials!r})")
    return _codes_of_grid_values(values, fmt)


def _codes_of_grid_values(values: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Codes of values that already lie on the format's grid (or are +-inf / NaN)."""
    work = _FLOAT64 if values.dtype == torch.float64 else _FLOAT32
    M = fmt.mantissa_bits
    magnitude = values.abs()
    bits = magnitude.view(work.int_dtype)
    normal_code = (bits >> (work.mantissa_bits - M)) - ((work.bias - fmt.bias) << M)
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
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes: expected an integer tensor, got {getattr(codes, 'dtype', type(codes))}")
    _check_scale(scale, codes.shape)
    table = _decoded_table(fmt, codes.device)
    values = table[codes.to(torch.int64)]
    if not (isinstance(scale, (int, float)) and scale == 1):
        values = values * (scale.to(values.device) if isinstance(scale, torch.Tensor) else scale)
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
