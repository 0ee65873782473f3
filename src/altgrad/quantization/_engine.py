"""The quantize engine: the rounding kernels, the counter hash, the chunked driver, the compile cache.

Internal to ``ops`` (whose docstring specifies the results). How the kernels get them:

* ``"nearest"`` is one float add and subtract: with ``C = 2^(e - M + P)`` for the binade ``e`` of
  |y| (clamped to the format's exponent range), ``(|y| + C) - C`` is |y| rounded by the FPU to a
  multiple of the format's spacing ``2^(e - M)``, ties to even, in a single rounding.
* ``"stochastic"`` scales y by ``2^k`` so that the format's smallest normal binade lands on the
  working float's, where the working float's own subnormals reproduce the format's; adding a random
  integer below ``2^(P - M)`` to the bit pattern and clearing those low bits is then stochastic
  rounding everywhere.
* ``"toward_zero"`` divides by the binade's spacing (a power of two), floors and multiplies back.

One call of ``fake_quantize`` is one ``Job`` (format, constants, options, scale, random keys). On the
CPU large tensors are processed in cache-sized chunks written into one preallocated output; on other
devices, and inside a ``torch.compile`` trace, the tensor is one piece. Every kernel uses in-place and
``out=`` ops only, so that the CPU loop over chunks allocates nothing.
"""

from __future__ import annotations

import functools
import math
import types
from dataclasses import dataclass, replace

import torch

from . import _memory
from .formats import FloatFormat

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


def _bits(value: float, work: _WorkingFloat) -> int:
    """The bit pattern of a non-negative ``value`` that ``work`` represents exactly, in pure Python
    (no tensor, so that a torch.compile trace of the caller has no host sync)."""
    mantissa, exponent = math.frexp(value)  # value = mantissa * 2^exponent, 0.5 <= mantissa < 1
    if value == 0 or exponent - 1 < work.emin:  # zero or subnormal: the field is value / 2^(emin - P)
        return int(math.ldexp(value, work.mantissa_bits - work.emin))
    fraction = int(math.ldexp(mantissa, work.mantissa_bits + 1)) - (1 << work.mantissa_bits)
    return ((exponent - 1 + work.bias) << work.mantissa_bits) | fraction


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
        max_finite_bits=_bits(fmt.max_finite, work),
        scaled_max_finite_bits=_bits(fmt.max_finite * 2.0 ** (work.emin - fmt.emin), work),
        inf_bits=((1 << (work.bits - 1 - P)) - 1) << P,
        nan_bits=(((1 << (work.bits - 1 - P)) - 1) << P) | (1 << (P - 1)),
    )


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


# ---- the job ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One rounding of one tensor: what every kernel reads, instead of a dozen positional arguments.

    ``scale`` is None (scale 1), a float or a 0-dim tensor of the working float (per-channel scales
    are applied around the kernels); ``fused`` is ``scale * 2^-k`` when that is a normal number
    (stochastic rounding then divides once); ``keys`` are the hash keys of stochastic rounding.
    """

    fmt: FloatFormat
    plan: _Plan
    rounding: str
    overflow: str
    scale: float | torch.Tensor | None
    fused: float | torch.Tensor | None
    multiply_back: bool
    keys: tuple | None


# ---- the kernels ---------------------------------------------------------------------------------------
#
# Each kernel rounds one flat piece ``src`` into ``a`` (working float) using ``scratch`` (working int).


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


def _nearest_kernel(job: Job, src: torch.Tensor, a: torch.Tensor, scratch: torch.Tensor) -> None:
    fmt, plan, scale = job.fmt, job.plan, job.scale
    if scale is None and src.dtype == a.dtype:
        torch.abs(src, out=a)
    else:
        _load_scaled(a, src, scale).abs_()
    zero = (src == 0) if not fmt.has_zero else None
    exponent = torch.bitwise_and(a.view(scratch.dtype), plan.exponent_mask, out=scratch)
    power = exponent.clamp_(plan.lowest, plan.highest).view(a.dtype)  # 2^e, e clamped to [emin, emax]
    a.add_(power, alpha=plan.alpha).sub_(power, alpha=plan.alpha)
    if job.overflow == "saturate":
        a.clamp_(max=plan.max_finite)  # keeps NaN
    else:
        _overflow_to_special(a, scratch, plan, job.overflow)
    _finish_sign(a, src, fmt, zero)
    if job.multiply_back and scale is not None:
        a.mul_(scale)


def _toward_zero_kernel(job: Job, src: torch.Tensor, a: torch.Tensor, scratch: torch.Tensor) -> None:
    fmt, plan, scale = job.fmt, job.plan, job.scale
    _load_scaled(a, src, scale).abs_()
    zero = (src == 0) if not fmt.has_zero else None
    if job.overflow == "saturate":
        a.clamp_(max=plan.max_finite)  # finite overflow truncates to max_finite (IEEE 754); keeps NaN
    else:  # the same for finite values; +-inf becomes inf or NaN, NaN stays NaN (as bit patterns)
        bits = a.view(scratch.dtype)
        special = torch.sub(bits, plan.inf_bits - 1, out=scratch).clamp_(0, 1)  # 1 for inf and NaN
        special.mul_(bits if job.overflow == "inf" else plan.nan_bits)
        torch.maximum(bits.clamp_(max=plan.max_finite_bits), special, out=bits)
    exponent = torch.bitwise_and(a.view(scratch.dtype), plan.exponent_mask, out=scratch)
    spacing = exponent.clamp_(plan.lowest, plan.highest).sub_(plan.spacing_offset).view(a.dtype)
    a.div_(spacing).floor_().mul_(spacing)  # exact: the spacing is a power of two
    _finish_sign(a, src, fmt, zero)
    if job.multiply_back and scale is not None:
        a.mul_(scale)


def _stochastic_kernel(
    job: Job, src: torch.Tensor, a: torch.Tensor, scratch: torch.Tensor, r: torch.Tensor
) -> None:
    """``r``: random integers in [0, 2^(P - M))."""
    fmt, plan, scale, fused, overflow = job.fmt, job.plan, job.scale, job.fused, job.overflow
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
    if job.multiply_back and fused is not None:
        a.mul_(fused)  # (a * 2^-k) * scale in one rounding
        return
    if plan.k:
        a.mul_(2.0**-plan.k)
    if job.multiply_back and scale is not None:
        a.mul_(scale)


def _fused_divisor(scale: float, k: int, dtype: torch.dtype) -> float | None:
    """``scale`` (rounded to ``dtype``) times 2^-k when that is a normal number of ``dtype``."""
    rounded = float(torch.tensor(scale, dtype=dtype))
    value = rounded * 2.0**-k
    info = torch.finfo(dtype)
    return value if info.tiny <= value <= info.max else None


# ---- codes ---------------------------------------------------------------------------------------------


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
    values: torch.Tensor,
    codes: torch.Tensor,
    tmp: torch.Tensor,
    tmp2: torch.Tensor,
    fmt,
    plan,
    stand_ins: tuple[float, float] | None = None,
) -> None:
    """Codes of on-grid ``values`` (working float) into ``codes``, using two working-int temporaries.

    Scaled by 2^k so that the format's smallest normal binade is the working float's, the working
    float's bit pattern shifted right by P - M is the format's code, subnormals included; inf and
    NaN are first replaced by finite stand-ins that land on their codes (``_special_stand_ins(fmt)``,
    computed here unless given: a torch.compile trace of the caller cannot run it).
    """
    if not fmt.subnormals and fmt.mantissa_bits > 0:  # no such alignment: the generic way
        codes.copy_(_codes_of_grid_values(values, fmt))
        return
    work = plan.work
    k = plan.k if fmt.subnormals else plan.k - 1  # E8M0: 2^emin is code 0, the working float's 2^(emin - 1)
    inf, nan = _special_stand_ins(fmt) if stand_ins is None else stand_ins
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


# ---- the driver ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What a caller of the engine asks for: ``Q(x / scale)`` in ``fmt``, times ``scale`` if
    ``multiply_back``, in ``out_dtype`` (default: the working float); ``compiled``: through
    ``torch.compile`` where that gives the same bits (see ``_compiles``)."""

    fmt: FloatFormat
    rounding: str = "nearest"
    overflow: str = "saturate"
    multiply_back: bool = True
    out_dtype: torch.dtype | None = None
    compiled: bool = False


def fake_quantize(
    x: torch.Tensor, scale: float | torch.Tensor, request: Request, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``Q(x / scale)`` (times ``scale`` if ``request.multiply_back``), in ``request.out_dtype``."""
    out, _ = _drive(x, scale, request, generator, codes=False)
    return out


def fake_quantize_codes(
    x: torch.Tensor, scale: float | torch.Tensor, request: Request, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The integer codes of ``Q(x / scale)`` (uint8, or int32 above 8 bits), and for a format without a
    NaN code a 0-dim bool tensor telling whether any value was NaN (None otherwise)."""
    return _drive(x, scale, request, generator, codes=True)


def _drive(
    x: torch.Tensor,
    scale: float | torch.Tensor,
    request: Request,
    generator: torch.Generator | None,
    codes: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resolve the scale (per-channel scales are divided out first), build the ``Job``, and run it
    one of three ways: one piece inside a caller's trace, the compiled piece, or chunked kernels."""
    fmt = request.fmt
    work = _working_float(fmt, x.dtype)
    plan = _plan(fmt, work)
    tracing = torch.compiler.is_compiling()
    empty = torch.empty if tracing else _memory.empty  # the compiler owns the memory of a traced graph
    multiply_back, out_dtype = request.multiply_back, request.out_dtype or work.dtype
    src = x.detach()
    channel_scale = None
    if isinstance(scale, torch.Tensor):
        if scale.numel() == 1:
            scale = scale.detach().reshape(()).to(device=x.device, dtype=work.dtype)
        else:  # per-channel: divide up front, round at scale 1, multiply back
            channel_scale = scale.detach().to(device=x.device, dtype=work.dtype)
            src = torch.div(src, channel_scale, out=empty(x.shape, dtype=work.dtype, device=x.device))
            scale = None
    elif scale == 1:
        scale = None
    else:
        scale = float(scale)
    if codes:
        multiply_back = False
        out_dtype = torch.uint8 if fmt.total_bits <= 8 else torch.int32
    fused = None
    if request.rounding == "stochastic" and isinstance(scale, float):
        fused = _fused_divisor(scale, plan.k, work.dtype)

    src = src.contiguous().view(-1)
    result_dtype = work.dtype if channel_scale is not None and not codes else out_dtype
    out = empty(x.shape, dtype=result_dtype, device=x.device)
    flat_out = out.view(-1)
    n = src.numel()
    keys = _draw_keys(generator, x.device, work.bits) if request.rounding == "stochastic" and n else None
    job = Job(fmt, plan, request.rounding, request.overflow, scale, fused, multiply_back, keys)
    any_nan = torch.zeros((), dtype=torch.bool, device=x.device) if codes and not fmt.has_nan else None
    if n == 0:
        pass
    elif tracing and not codes:  # inside the caller's torch.compile: one piece, the compiler fuses it
        _whole_tensor(job, src, flat_out)
    elif request.compiled and _compiles(work, request.rounding, x.device) and not codes:
        run = _compiled_whole_tensor(job, src.dtype, result_dtype)
        run(_with_tensor_numbers(job, x.device), src, flat_out)
    else:
        _chunked(job, src, flat_out, result_dtype, codes, any_nan)
    if codes:
        return out, any_nan
    if channel_scale is not None:
        if multiply_back:
            out.mul_(channel_scale)
        out = out.to(out_dtype)
    return out, None


def _chunked(
    job: Job,
    src: torch.Tensor,
    flat_out: torch.Tensor,
    result_dtype: torch.dtype,
    codes: bool,
    any_nan: torch.Tensor | None,
) -> None:
    """The eager path: cache-sized pieces on the CPU (one piece elsewhere) into ``flat_out``; with
    ``codes``, their codes, and ``any_nan`` (when not None) or-ed with whether a value was NaN."""
    work, device, n = job.plan.work, src.device, src.numel()
    chunk = n if device.type != "cpu" else min(n, max(1, CHUNK_BYTES // work.dtype.itemsize))
    direct = result_dtype == work.dtype
    scratch = _memory.chunk_buffer("scratch", chunk, work.int_dtype, device, CHUNK_BYTES)
    buffer = None if direct else _memory.chunk_buffer("values", chunk, work.dtype, device, CHUNK_BYTES)
    randoms = None
    if job.keys is not None or codes:
        randoms = _memory.chunk_buffer("randoms", chunk, work.int_dtype, device, CHUNK_BYTES)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        m = stop - start
        dst = flat_out[start:stop] if direct else buffer[:m]
        piece_randoms = None if randoms is None else randoms[:m]
        _run_piece(job, src[start:stop], dst, scratch[:m], piece_randoms, start)
        if codes:
            if any_nan is not None:  # amax propagates NaN (and is much faster than isnan)
                any_nan.bitwise_or_(torch.isnan(dst.amax()))
            _encode_piece(dst, flat_out[start:stop], scratch[:m], piece_randoms, job.fmt, job.plan)
        elif not direct:
            flat_out[start:stop].copy_(dst)


def _run_piece(
    job: Job,
    src: torch.Tensor,
    dst: torch.Tensor,
    scratch: torch.Tensor,
    randoms: torch.Tensor | None,
    start: int,
) -> None:
    """Round one flat piece (elements start .. start + len(src) of the whole tensor) into ``dst``."""
    if job.rounding == "nearest":
        _nearest_kernel(job, src, dst, scratch)
    elif job.rounding == "toward_zero":
        _toward_zero_kernel(job, src, dst, scratch)
    else:
        assert randoms is not None and job.keys is not None
        r = _random_ints(randoms, scratch, start, job.keys, job.plan)
        _stochastic_kernel(job, src, dst, scratch, r)


def _whole_tensor(job: Job, src: torch.Tensor, out: torch.Tensor) -> None:
    """One piece, fresh buffers (a compiler fuses them away), written into ``out``."""
    work = job.plan.work
    n = src.numel()
    dst = torch.empty(n, dtype=work.dtype, device=src.device)
    scratch = torch.empty(n, dtype=work.int_dtype, device=src.device)
    if job.rounding == "stochastic":
        assert job.keys is not None
        randoms = torch.empty(n, dtype=work.int_dtype, device=src.device)
        hash_tmp = torch.empty(n, dtype=work.int_dtype, device=src.device)
        base = torch.arange(n, dtype=work.int_dtype, device=src.device) * _signed(
            _GOLDEN[work.bits], work.bits
        )
        r = _random_ints(randoms, hash_tmp, 0, job.keys, job.plan, base)
        _stochastic_kernel(job, src, dst, scratch, r)
    else:
        _run_piece(job, src, dst, scratch, None, 0)
    out.copy_(dst)


# ---- the compile cache ---------------------------------------------------------------------------------

_COMPILED: dict[tuple, object] = {}


def _compiles(work: _WorkingFloat, rounding: str, device: torch.device) -> bool:
    """Where ``Request.compiled`` really compiles: float32 arithmetic (inductor mis-compiles the int64
    hash, torch 2.13), and not stochastic rounding on the CPU (inductor's scalar loops are slower)."""
    return work is _FLOAT32 and not (rounding == "stochastic" and device.type == "cpu")


def _with_tensor_numbers(job: Job, device: torch.device) -> Job:
    """``job`` with its scale, fused divisor and keys as 0-dim tensors, so that torch.compile does not
    specialise (and recompile) on their values."""
    work = job.plan.work

    def as_tensor(value, dtype: torch.dtype):
        if value is None or isinstance(value, torch.Tensor):
            return value
        return torch.tensor(value, dtype=dtype, device=device)

    keys = None if job.keys is None else tuple(as_tensor(k, work.int_dtype) for k in job.keys)
    return replace(
        job, scale=as_tensor(job.scale, work.dtype), fused=as_tensor(job.fused, work.dtype), keys=keys
    )


def _compiled_whole_tensor(job: Job, src_dtype: torch.dtype, out_dtype: torch.dtype):
    """A torch.compile'd ``_whole_tensor`` per static configuration of ``job``.

    Each configuration gets its own code object, hence its own dynamo cache: the recompile limit
    (8 per code object) is never shared between formats.
    """
    key = (
        job.fmt, job.rounding, job.overflow, src_dtype, out_dtype,
        job.scale is None, job.fused is None, job.multiply_back,
    )  # fmt: skip
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = torch.compile(own_copy(_whole_tensor, len(_COMPILED)), dynamic=True)
    return compiled


def own_copy(function: types.FunctionType, number: int, **bound: object) -> types.FunctionType:
    """A copy of ``function`` with its own code object (named ``<name>_<number>``), so that each
    ``torch.compile`` of a copy has its own dynamo cache and recompile limit; ``bound`` adds globals
    the copy reads as constants (a per-configuration value a trace should specialise on)."""
    code = function.__code__.replace(co_name=f"{function.__name__}_{number}")
    return types.FunctionType(code, {**function.__globals__, **bound}, code.co_name)
