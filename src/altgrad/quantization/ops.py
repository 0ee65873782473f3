"""Fake quantization to any registered format: quantize, encode, decode.

``quantize(x, fmt, scale)`` returns ``Q(x / scale) * scale`` in x's dtype, where ``Q`` rounds to the
format's grid and ``x / scale`` is evaluated in the working float. The arithmetic is float32 (float64
for float64 inputs, and for formats whose range does not fit float32's, e.g. bfloat16 and E8M0),
vectorized, with no host synchronisation. On the CPU, large tensors are processed in cache-sized
chunks written into one preallocated output.

Rounding (``rounding=``):

* ``"nearest"``: to the nearest grid value, ties to the even integral significand. For M >= 1 this
  is the even code (IEEE roundTiesToEven); for M = 0 formats (E7M0, E8M0) a tie between 2^e and
  2^(e+1) goes up, as in ml_dtypes and torch (gfloat picks the even code instead).
* ``"stochastic"``: away from zero with probability (|y| - low) / (high - low), to a resolution
  of 2^-(P - M), P being the working float's mantissa width (23 or 52): exact for inputs in the
  format's normal range; below it, the distance is first rounded to that resolution. The random
  bits come from a counter-based hash of each element's index, keyed by two numbers drawn from
  ``generator`` (or the default generator of x's device): the same generator state gives the same
  result however the tensor is chunked, and the hash is the same on every device.
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

``quantize_compiled`` has the same signature and gives the same results bit for bit, through
``torch.compile`` (one fused pass; optional, it needs a working inductor backend).

Example::

    >>> import torch
    >>> from altgrad.quantization import quantize, encode, decode, E4M3
    >>> x = torch.tensor([0.3, 500.0, -0.0])
    >>> quantize(x, E4M3).tolist()
    [0.3125, 448.0, -0.0]
    >>> encode(x, E4M3).tolist()
    [42, 126, 128]
    >>> decode(encode(x, E4M3), E4M3).tolist()
    [0.3125, 448.0, -0.0]
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
import threading
import types
from dataclasses import dataclass
from typing import Literal

import torch

from .formats import FloatFormat, get_format
from .types import ScaleLike

Rounding = Literal["nearest", "stochastic", "toward_zero"]
Overflow = Literal["saturate", "inf", "nan"]
ROUNDING_MODES: tuple[str, ...] = ("nearest", "stochastic", "toward_zero")
OVERFLOW_POLICIES: tuple[str, ...] = ("saturate", "inf", "nan")

CHUNK_BYTES = 1 << 21
"""Bytes of working float per CPU chunk: a chunk and its scratch stay in cache, Python overhead is small."""


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
    max_finite_bits: int  # bit pattern of max_finite in the working float
    scaled_max_finite_bits: int  # ... of max_finite * 2^k
    inf_bits: int
    nan_bits: int  # the working float's canonical quiet NaN


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
        max_finite_bits=int(torch.tensor(fmt.max_finite, dtype=work.dtype).view(work.int_dtype)),
        scaled_max_finite_bits=int(
            torch.tensor(fmt.max_finite * 2.0 ** (work.emin - fmt.emin), dtype=work.dtype).view(
                work.int_dtype
            )
        ),
        inf_bits=((1 << (work.bits - 1 - P)) - 1) << P,
        nan_bits=(((1 << (work.bits - 1 - P)) - 1) << P) | (1 << (P - 1)),
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
    """``arange(n) * golden`` in the word size (wrapping); cached on the CPU for the chunk length."""
    bits = int_dtype.itemsize * 8
    key = (torch.device(device), int_dtype)
    cached = _COUNTERS.get(key)
    if cached is not None and cached.numel() >= n:
        return cached[:n]
    base = torch.arange(n, device=device, dtype=int_dtype).mul_(_signed(_GOLDEN[bits], bits))
    if device.type == "cpu" and n <= (1 << 24):
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


def _random_ints(
    out: torch.Tensor,
    tmp: torch.Tensor,
    start: int,
    keys: tuple,
    plan: _Plan,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Uniform integers in [0, 2^(P - M)) for elements start .. start + len(out), into ``out``.

    h = index * golden + offset (a Weyl sequence), h ^= h >> w/2, h *= odd multiplier, then the top
    P - M bits: multiply-shift hashing with a random odd multiplier. Depends only on the element's
    index and the keys, not on how the tensor is cut into chunks.
    """
    bits = plan.work.bits
    offset, multiplier = keys
    if base is None:
        base = _counter_base(out.device, out.dtype, out.numel())
    if isinstance(offset, int):
        torch.add(base, _signed(offset + start * _GOLDEN[bits], bits), out=out)
    else:  # tensor keys: one chunk only, start == 0
        torch.add(base, offset, out=out)
    torch.bitwise_right_shift(out, bits // 2, out=tmp)
    out.bitwise_xor_(tmp)
    out.mul_(multiplier)
    out.bitwise_right_shift_(bits - plan.random_bits)
    return out.bitwise_and_((1 << plan.random_bits) - 1)


# ---- the kernels ---------------------------------------------------------------------------------------
#
# Each kernel rounds one flat piece ``src`` into ``a`` (working float) using ``scratch`` (working int),
# with in-place and out= ops only, so that the CPU loop over chunks allocates nothing. ``scale`` is
# None, a float or a 0-dim tensor; per-channel scales are applied around the kernels.


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


def _overflow_to_special(
    a: torch.Tensor, scratch: torch.Tensor, plan: _Plan, overflow: str, max_bits: int | None = None
) -> None:
    """Non-negative ``a`` above max_finite becomes inf or NaN, without bool masks (slow on CPUs).

    On bit patterns of non-negative floats, order is integer order: s = clamp(bits - max_bits, 0, 1)
    is 1 exactly above max_finite, and max(bits, s * special_bits) replaces those (NaN stays NaN).
    """
    bits = a.view(scratch.dtype)
    special = plan.inf_bits if overflow == "inf" else plan.nan_bits
    max_bits = plan.max_finite_bits if max_bits is None else max_bits
    step = torch.sub(bits, max_bits, out=scratch).clamp_(0, 1).mul_(special)
    torch.maximum(bits, step, out=bits)


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
        _overflow_to_special(a, scratch, plan, overflow)
    _finish_sign(a, src, fmt, zero)
    if multiply_back and scale is not None:
        a.mul_(scale)


def _toward_zero_kernel(src, a, scratch, fmt, plan, overflow, scale, multiply_back) -> None:
    _load_scaled(a, src, scale).abs_()
    zero = (src == 0) if not fmt.has_zero else None
    if overflow == "saturate":
        a.clamp_(max=plan.max_finite)  # finite overflow truncates to max_finite (IEEE 754); keeps NaN
    else:  # the same for finite values; +-inf becomes inf or NaN, NaN stays NaN (as bit patterns)
        bits = a.view(scratch.dtype)
        special = torch.sub(bits, plan.inf_bits - 1, out=scratch).clamp_(0, 1)  # 1 for inf and NaN
        special.mul_(bits if overflow == "inf" else plan.nan_bits)
        torch.maximum(bits.clamp_(max=plan.max_finite_bits), special, out=bits)
    exponent = torch.bitwise_and(a.view(scratch.dtype), plan.exponent_mask, out=scratch)
    spacing = exponent.clamp_(plan.lowest, plan.highest).sub_(plan.spacing_offset).view(a.dtype)
    a.div_(spacing).floor_().mul_(spacing)  # exact: the spacing is a power of two
    _finish_sign(a, src, fmt, zero)
    if multiply_back and scale is not None:
        a.mul_(scale)


def _stochastic_kernel(src, a, scratch, fmt, plan, overflow, scale, fused, multiply_back, r) -> None:
    """``r``: random integers in [0, 2^(P - M)). ``fused``: scale * 2^-k, when that is normal."""
    y = scratch.view(a.dtype)  # y = (src / scale) * 2^k
    up = 2.0**plan.k
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
    torch.add(scratch, r, out=a.view(scratch.dtype)).bitwise_and_(plan.keep_mask)
    a.add_(y, alpha=0.0)  # NaN in y -> NaN; 0 * y is a zero of y's sign, so -0 stays -0
    if overflow != "saturate":  # y is no longer needed: its buffer becomes the scratch
        a.abs_()
        _overflow_to_special(a, scratch, plan, overflow, plan.scaled_max_finite_bits)
        torch.copysign(a, src, out=a)
    if not fmt.has_zero or not fmt.signed:
        a.abs_()
        if not fmt.has_zero:
            a.clamp_(min=fmt.min_subnormal * up).masked_fill_(src == 0, math.nan)
        if fmt.signed:
            torch.copysign(a, src, out=a)
        else:
            a.masked_fill_(src < 0, math.nan)
    if fmt.signed and not fmt.has_negative_zero:
        a.add_(0.0)
    if multiply_back and fused is not None:
        a.mul_(fused)  # (a * 2^-k) * scale in one rounding
        return
    if plan.k:
        a.mul_(2.0**-plan.k)
    if multiply_back and scale is not None:
        a.mul_(scale)


def _fused_divisor(scale: float, k: int, dtype: torch.dtype) -> float | None:
    """``scale`` (rounded to ``dtype``) times 2^-k when that is a normal number of ``dtype``."""
    rounded = float(torch.tensor(scale, dtype=dtype))
    value = rounded * 2.0**-k
    info = torch.finfo(dtype)
    return value if info.tiny <= value <= info.max else None


# ---- outputs -------------------------------------------------------------------------------------------

_HUGE_PAGE = 1 << 21
HUGE_PAGE_MIN_BYTES = 1 << 23
"""CPU outputs at least this large are advised to use transparent huge pages (Linux; a hint)."""


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def _empty(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fresh tensor; large CPU ones get MADV_HUGEPAGE before their first touch.

    A fresh 64 MB output costs 16k page faults (tens of ms, more than the arithmetic); with huge
    pages it costs 32. Memory use is unchanged: the tensor fills whole pages either way.
    """
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    if out.device.type == "cpu" and nbytes >= HUGE_PAGE_MIN_BYTES:
        madvise = _madvise()
        if madvise is not None:
            start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
            stop = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
            if stop > start:
                madvise(start, stop - start, 14)  # MADV_HUGEPAGE; failure only costs speed
    return out


_LOCAL = threading.local()


def _chunk_buffer(slot: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-thread reusable CPU chunk buffers: fresh ones would page-fault on every call."""
    if device.type != "cpu" or n * dtype.itemsize > CHUNK_BYTES * 2:
        return torch.empty(n, dtype=dtype, device=device)
    cache = getattr(_LOCAL, "buffers", None)
    if cache is None:
        cache = _LOCAL.buffers = {}
    buffer = cache.get(slot)
    if buffer is None or buffer.numel() * buffer.element_size() < n * dtype.itemsize:
        buffer = cache[slot] = torch.empty(max(n * dtype.itemsize, CHUNK_BYTES * 2), dtype=torch.uint8)
    return buffer[: n * dtype.itemsize].view(dtype)


# ---- the driver ----------------------------------------------------------------------------------------


def _run_piece(
    src, dst, scratch, randoms, start, fmt, plan, rounding, overflow, scale, fused, multiply_back, keys
):
    """Round one flat piece (elements start .. start + len(src) of the whole tensor) into ``dst``."""
    if rounding == "nearest":
        _nearest_kernel(src, dst, scratch, fmt, plan, overflow, scale, multiply_back)
    elif rounding == "toward_zero":
        _toward_zero_kernel(src, dst, scratch, fmt, plan, overflow, scale, multiply_back)
    else:
        r = _random_ints(randoms, scratch, start, keys, plan)
        _stochastic_kernel(src, dst, scratch, fmt, plan, overflow, scale, fused, multiply_back, r)


def _whole_tensor(src, out, fmt, plan, rounding, overflow, scale, fused, multiply_back, keys):
    """The compiled path: one piece, fresh buffers (the compiler fuses them away), written into ``out``."""
    work = plan.work
    n = src.numel()
    dst = torch.empty(n, dtype=work.dtype, device=src.device)
    scratch = torch.empty(n, dtype=work.int_dtype, device=src.device)
    if rounding == "stochastic":
        randoms = torch.empty(n, dtype=work.int_dtype, device=src.device)
        hash_tmp = torch.empty(n, dtype=work.int_dtype, device=src.device)
        base = torch.arange(n, dtype=work.int_dtype, device=src.device) * _signed(
            _GOLDEN[work.bits], work.bits
        )
        r = _random_ints(randoms, hash_tmp, 0, keys, plan, base)
        _stochastic_kernel(src, dst, scratch, fmt, plan, overflow, scale, fused, multiply_back, r)
    else:
        _run_piece(
            src, dst, scratch, None, 0, fmt, plan, rounding, overflow, scale, fused, multiply_back, keys
        )
    out.copy_(dst)


_COMPILED: dict[tuple, object] = {}


def _as_tensor(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Numbers as 0-dim tensors, so that torch.compile does not specialise (and recompile) on them."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    return torch.tensor(value, dtype=dtype, device=device)


def _compiled_whole_tensor(key: tuple):
    """A torch.compile'd ``_whole_tensor`` per static configuration.

    Each configuration gets its own code object, hence its own dynamo cache: the recompile limit
    (8 per code object) is never shared between formats.
    """
    compiled = _COMPILED.get(key)
    if compiled is None:
        code = _whole_tensor.__code__.replace(co_name=f"_whole_tensor_{len(_COMPILED)}")
        body = types.FunctionType(code, _whole_tensor.__globals__, code.co_name)
        compiled = torch.compile(body, dynamic=True)
        _COMPILED[key] = compiled
    return compiled


def _special_stand_ins(fmt: FloatFormat) -> tuple[float, float]:
    """Finite values whose codes, read as if they were numbers, are the inf and NaN codes.

    inf: the all-ones exponent field with a zero mantissa; NaN: the format's NaN code (for fnuz,
    the negative-zero code, i.e. -0.0). Formats without them get 0.
    """
    M, E = fmt.mantissa_bits, fmt.exponent_bits
    width = E + M

    def as_number(code: int) -> float:
        exponent, mantissa = (code & ((1 << width) - 1)) >> M, code & ((1 << M) - 1)
        if exponent == 0 and fmt.subnormals:
            value = math.ldexp(mantissa, fmt.emin - M)
        else:
            value = math.ldexp((1 << M) + mantissa, exponent - fmt.bias - M)
        return -value if fmt.signed and code >> width else value

    inf = as_number(((1 << E) - 1) << M) if fmt.has_inf else 0.0
    nan = as_number(fmt.encode(math.nan)) if fmt.has_nan else 0.0
    return inf, nan


def _encode_piece(
    values: torch.Tensor, codes: torch.Tensor, tmp: torch.Tensor, tmp2: torch.Tensor, fmt, plan
) -> None:
    """Codes of on-grid ``values`` (working float) into ``codes``, using two working-int temporaries.

    Scaled by 2^k so that the format's smallest normal binade is the working float's, the working
    float's bit pattern shifted right by P - M is the format's code, subnormals included; inf and
    NaN are first replaced by finite stand-ins that land on their codes.
    """
    if not fmt.subnormals and fmt.mantissa_bits > 0:  # no such alignment: the generic way
        codes.copy_(_codes_of_grid_values(values, fmt))
        return
    work = plan.work
    k = plan.k if fmt.subnormals else plan.k - 1  # E8M0: 2^emin is code 0, the working float's 2^(emin - 1)
    inf, nan = _special_stand_ins(fmt)
    y = tmp.view(values.dtype)
    torch.nan_to_num(values, nan=nan, posinf=inf, neginf=-inf, out=y)
    if k:
        y.mul_(2.0**k)
    width = fmt.exponent_bits + fmt.mantissa_bits
    magnitude = torch.bitwise_and(tmp, (1 << (work.bits - 1)) - 1, out=tmp2)
    magnitude.bitwise_right_shift_(work.mantissa_bits - fmt.mantissa_bits)
    if fmt.signed:  # the sign bit, moved from bit (bits - 1) to bit ``width``
        magnitude.bitwise_or_(tmp.bitwise_right_shift_(work.bits - 1 - width).bitwise_and_(1 << width))
    codes.copy_(magnitude)


def _compiles(work: _WorkingFloat, rounding: str, device: torch.device) -> bool:
    """Where quantize_compiled really compiles (see its docstring for the exceptions)."""
    return work is _FLOAT32 and not (rounding == "stochastic" and device.type == "cpu")


def _fake_quantize(
    x: torch.Tensor,
    fmt: FloatFormat,
    scale: ScaleLike,
    rounding: str,
    overflow: str,
    generator: torch.Generator | None,
    multiply_back: bool,
    out_dtype: torch.dtype | None = None,
    compiled: bool = False,
    codes: bool = False,
) -> torch.Tensor:
    """``Q(x / scale)``, times ``scale`` if ``multiply_back``, in ``out_dtype`` (default: working float).

    With ``codes=True``: the integer codes of ``Q(x / scale)`` instead (uint8 or int32); NaN values in
    a format without a NaN code are reported by a trailing 0-dim bool tensor: ``(codes, any_nan)``.
    """
    work = _working_float(fmt, x.dtype)
    plan = _plan(fmt, work)
    out_dtype = work.dtype if out_dtype is None else out_dtype
    src = x.detach()
    channel_scale = None
    if isinstance(scale, torch.Tensor):
        if scale.numel() == 1:
            scale = scale.detach().reshape(()).to(device=x.device, dtype=work.dtype)
        else:  # per-channel: divide up front, round at scale 1, multiply back
            channel_scale = scale.detach().to(device=x.device, dtype=work.dtype)
            src = torch.div(src, channel_scale, out=_empty(x.shape, work.dtype, x.device))
            scale = None
    elif scale == 1:
        scale = None
    else:
        scale = float(scale)
    if codes:
        multiply_back = False
        out_dtype = torch.uint8 if fmt.total_bits <= 8 else torch.int32
    fused = None
    if rounding == "stochastic" and isinstance(scale, float):
        fused = _fused_divisor(scale, plan.k, work.dtype)

    src = src.contiguous().view(-1)
    result_dtype = work.dtype if channel_scale is not None and not codes else out_dtype
    out = _empty(x.shape, result_dtype, x.device)
    flat_out = out.view(-1)
    n = src.numel()
    keys = _draw_keys(generator, x.device, work.bits) if rounding == "stochastic" and n else None
    any_nan = torch.zeros((), dtype=torch.bool, device=x.device) if codes and not fmt.has_nan else None
    if n == 0:
        pass
    elif compiled and _compiles(work, rounding, x.device) and not codes:
        static = (
            fmt,
            rounding,
            overflow,
            src.dtype,
            result_dtype,
            scale is None,
            fused is None,
            multiply_back,
        )
        as_float = lambda v: _as_tensor(v, work.dtype, x.device)  # noqa: E731
        tensor_keys = None if keys is None else tuple(_as_tensor(k, work.int_dtype, x.device) for k in keys)
        run = _compiled_whole_tensor(static)
        run(
            src,
            flat_out,
            fmt,
            plan,
            rounding,
            overflow,
            as_float(scale),
            as_float(fused),
            multiply_back,
            tensor_keys,
        )
    else:
        chunk = n if x.device.type != "cpu" else min(n, max(1, CHUNK_BYTES // work.dtype.itemsize))
        direct = result_dtype == work.dtype
        scratch = _chunk_buffer("scratch", chunk, work.int_dtype, x.device)
        buffer = None if direct else _chunk_buffer("values", chunk, work.dtype, x.device)
        randoms = (
            _chunk_buffer("randoms", chunk, work.int_dtype, x.device) if keys is not None or codes else None
        )
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            m = stop - start
            dst = flat_out[start:stop] if direct else buffer[:m]
            piece_randoms = None if randoms is None else randoms[:m]
            _run_piece(
                src[start:stop], dst, scratch[:m], piece_randoms, start,
                fmt, plan, rounding, overflow, scale, fused, multiply_back, keys,
            )  # fmt: skip
            if codes:
                if any_nan is not None:  # amax propagates NaN (and is much faster than isnan)
                    any_nan |= torch.isnan(dst.amax())
                _encode_piece(dst, flat_out[start:stop], scratch[:m], piece_randoms, fmt, plan)
            elif not direct:
                flat_out[start:stop].copy_(dst)
    if codes:
        return out, any_nan
    if channel_scale is not None:
        if multiply_back:
            out.mul_(channel_scale)
        out = out.to(out_dtype)
    return out


def _saturated(x: torch.Tensor, fmt: FloatFormat, scale: ScaleLike) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        scale = scale.to(device=x.device)
    return (x.abs() / scale) > fmt.max_finite


class _QuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fmt, scale, rounding, overflow, generator, mask_saturated_grad, compiled):  # type: ignore[override]
        values = _fake_quantize(x, fmt, scale, rounding, overflow, generator, True, x.dtype, compiled)
        ctx.mask = _saturated(x.detach(), fmt, scale) if mask_saturated_grad else None
        return values

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grad = grad_output if ctx.mask is None else grad_output.masked_fill(ctx.mask, 0.0)
        return grad, None, None, None, None, None, None, None


def _prepare(x, format, scale, rounding, overflow) -> tuple[FloatFormat, str]:
    fmt = get_format(format)
    overflow = _check_options(fmt, rounding, overflow)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    _check_scale(scale, x.shape)
    return fmt, overflow


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
    fmt, overflow = _prepare(x, format, scale, rounding, overflow)
    return _QuantizeSTE.apply(x, fmt, scale, rounding, overflow, generator, mask_saturated_grad, False)


def quantize_compiled(
    x: torch.Tensor,
    format: str | FloatFormat,
    scale: ScaleLike = 1.0,
    rounding: Rounding = "nearest",
    overflow: Overflow | None = None,
    generator: torch.Generator | None = None,
    mask_saturated_grad: bool = False,
) -> torch.Tensor:
    """``quantize`` through ``torch.compile``: the same results bit for bit, one fused pass.

    Optional: it needs a working inductor backend (a C++ compiler on the CPU, triton on CUDA). The
    first call for each format and option set compiles (seconds to tens of seconds on a small CPU);
    shapes are dynamic, so new sizes do not recompile, and float scales are passed as tensors (no
    recompiles either). Some cases run the eager kernels instead (same results): formats and inputs
    that need float64 arithmetic (bfloat16, E8M0, float64 inputs), because inductor mis-compiles
    their int64 random-number hash (torch 2.13); and stochastic rounding on the CPU, where inductor
    turns the bit-level hash into scalar loops that are slower than the eager kernels.
    """
    fmt, overflow = _prepare(x, format, scale, rounding, overflow)
    return _QuantizeSTE.apply(x, fmt, scale, rounding, overflow, generator, mask_saturated_grad, True)


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
    fmt, overflow = _prepare(x, format, scale, rounding, overflow)
    with torch.no_grad():
        codes, any_nan = _fake_quantize(x, fmt, scale, rounding, overflow, generator, False, codes=True)
    if check_nan and any_nan is not None and bool(any_nan):
        raise ValueError(f"x: NaN has no code in {fmt.name} (specials={fmt.specials!r})")
    return codes


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
    if codes.device.type == "cpu" and codes.numel() and codes.dtype != torch.bool:  # no device sync elsewhere
        low, high = (int(v) for v in torch.aminmax(codes.to(torch.int64)))
        if low < 0 or high >= fmt.num_codes:
            raise ValueError(
                f"codes: {fmt.name} has codes 0..{fmt.num_codes - 1}, got values in {low}..{high}"
            )
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


def __getattr__(name: str) -> object:
    """The original AltGrad's names at the import path it used, defined in ``compat``
    (docs/compat.md): ``QuantizeFunc``, ``DequantizeFunc``, ``dequantize``."""
    if name in ("QuantizeFunc", "DequantizeFunc", "dequantize"):
        from altgrad.quantization import compat

        return getattr(compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
