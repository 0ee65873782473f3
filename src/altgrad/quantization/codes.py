"""Codes of a float32 tensor in one native cast, for the formats torch stores natively.

``ops.encode(x, fmt, scale)`` rounds ``x / scale`` to the format's grid in its own float32 kernels
and then reads the codes off the rounded values (about fifteen elementwise passes). Where ``fmt``
*is* one of torch's float8 dtypes (the same 256 values at the same codes: E4M3 = float8_e4m3fn,
E5M2 = float8_e5m2, and the two fnuz formats), round-to-nearest-even with saturation is three passes:

    codes = clamp(x / scale, -max_finite, max_finite).to(float8 dtype).view(uint8)

the division done exactly as ``ops`` does it (float32; a 0-dim, per-channel or float scale; none at
scale 1), and NaN mapped to the code ``ops.encode`` gives it (torch keeps the sign of a NaN;
altgrad's NaN code has none): about 2.5x faster than ``ops.encode`` on a CPU. The codes equal
``ops.encode``'s bit for bit, and the values
``decode_native(codes, fmt, scale)`` equal ``ops.quantize``'s (``tests/quantization/test_codes.py``
checks both, and ml_dtypes' casts, on every float32 next to each grid value and midpoint).

``quantize_keeping_codes`` is the weight quantizer's step when a flip tracker wants the codes of the
forward's weight: the fake-quantized weight (straight-through) and its codes from one encode.

Example::

    >>> x = torch.tensor([0.3, 500.0, -0.0])
    >>> native_encode(x, get_format("E4M3")).tolist()
    [42, 126, 128]
"""

from __future__ import annotations

import functools
import math

import torch

from .formats import FloatFormat, get_format
from .ops import encode, quantize, straight_through

ScaleLike = float | torch.Tensor

NATIVE_DTYPES: tuple[torch.dtype, ...] = (
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
)
"""torch's float8 dtypes a format may coincide with (checked code by code, see ``native_dtype``)."""


@functools.cache
def native_dtype(fmt: FloatFormat) -> torch.dtype | None:
    """The torch float8 dtype holding exactly ``fmt``'s values at the same codes (NaN where ``fmt`` has
    NaN), or None."""
    if fmt.total_bits != 8:
        return None
    ours = fmt.values().to(torch.float32)
    for dtype in NATIVE_DTYPES:
        theirs = torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32)
        nan = torch.isnan(ours)
        same_sign = torch.equal(torch.signbit(ours[~nan]), torch.signbit(theirs[~nan]))  # -0 at one code
        if torch.equal(nan, torch.isnan(theirs)) and same_sign and torch.equal(ours[~nan], theirs[~nan]):
            return dtype
    return None


@functools.cache
def _nan_fixups(fmt: FloatFormat) -> tuple[tuple[int, int], ...]:
    """(torch's code, altgrad's code) for each NaN code torch's cast gives that ``ops.encode`` does not."""
    dtype = native_dtype(fmt)
    assert dtype is not None and fmt.has_nan
    ours = int(encode(torch.tensor([math.nan]), fmt)[0])
    theirs = torch.tensor([math.nan, -math.nan]).to(dtype).view(torch.uint8).tolist()
    return tuple((code, ours) for code in sorted(set(theirs)) if code != ours)


def has_native_encode(fmt: FloatFormat, x: torch.Tensor) -> bool:
    """Whether ``native_encode`` takes the native cast for ``x`` (float32, a native format)."""
    return x.dtype == torch.float32 and native_dtype(fmt) is not None


def _scaled(x: torch.Tensor, scale: ScaleLike) -> torch.Tensor:
    """``x / scale`` in float32 exactly as ``ops`` computes it (a new tensor; ``x`` at scale 1)."""
    if isinstance(scale, torch.Tensor):
        divisor = scale.detach().to(device=x.device, dtype=torch.float32)
        return torch.div(x, divisor.reshape(()) if divisor.numel() == 1 else divisor)
    if scale == 1:
        return x.clone()
    return torch.div(x, float(scale))


def native_encode(x: torch.Tensor, format: str | FloatFormat, scale: ScaleLike = 1.0) -> torch.Tensor:
    """``ops.encode(x, format, scale, check_nan=False)`` (nearest, saturate) as uint8 codes, through
    torch's float8 cast where ``has_native_encode``; ``ops.encode`` otherwise. No host sync."""
    fmt = get_format(format)
    if not has_native_encode(fmt, x):
        return encode(x, fmt, scale, check_nan=False)
    with torch.no_grad():
        y = _scaled(x.detach(), scale).clamp_(-fmt.max_finite, fmt.max_finite)  # keeps NaN
        codes = y.to(native_dtype(fmt)).view(torch.uint8)
        for theirs, ours in _nan_fixups(fmt) if fmt.has_nan else ():
            replace_code(codes, theirs, ours)
    return codes


@functools.cache
def _table(fmt: FloatFormat, device: torch.device) -> torch.Tensor:
    """The float32 value of each of the format's 256 codes (-0 and NaN at their codes)."""
    return fmt.values().to(device=device, dtype=torch.float32)


def decode_native(codes: torch.Tensor, format: str | FloatFormat, scale: ScaleLike = 1.0) -> torch.Tensor:
    """Float32 values of uint8 ``codes`` times ``scale``, multiplied as ``ops.quantize`` multiplies
    back: its values bit for bit. A 256-entry table lookup (torch's float8 upcast is ~5x slower on CPUs)."""
    fmt = get_format(format)
    if fmt.total_bits != 8 or codes.dtype != torch.uint8:
        raise ValueError(f"codes: expected uint8 codes of an 8-bit format, got {codes.dtype} for {fmt.name}")
    table = _table(fmt, codes.device)
    values = torch.index_select(table, 0, codes.reshape(-1).to(torch.int32)).view(codes.shape)
    if isinstance(scale, torch.Tensor):
        divisor = scale.detach().to(device=codes.device, dtype=torch.float32)
        return values.mul_(divisor.reshape(()) if divisor.numel() == 1 else divisor)
    return values if scale == 1 else values.mul_(float(scale))


def quantize_keeping_codes(
    x: torch.Tensor,
    format: str | FloatFormat,
    scale: ScaleLike,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(quantize(x, format, scale, rounding, generator=generator), codes)``: the fake-quantized
    tensor (straight-through gradient) and the uint8 codes it was decoded from, for a native format
    rounded to nearest; ``(quantize(...), None)`` otherwise (the codes would be another rounding's)."""
    fmt = get_format(format)
    if rounding != "nearest" or not has_native_encode(fmt, x):
        return quantize(x, fmt, scale, rounding=rounding, generator=generator), None
    codes = native_encode(x, fmt, scale)
    return straight_through(x, decode_native(codes, fmt, scale)), codes


def replace_code(codes: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """``codes`` (uint8) with every ``old`` replaced by ``new``, in place, in wrapping byte arithmetic:
    ``codes += (new - old) * (1 - min(codes ^ old, 1))`` (a bool mask and masked_fill cost ~20x more
    on CPUs)."""
    hit = torch.bitwise_xor(codes, old).clamp_(max=1).neg_().add_(1)  # 1 where codes == old
    return codes.add_(hit.mul_((new - old) % 256))
