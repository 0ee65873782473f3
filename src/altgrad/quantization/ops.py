"""Fake quantization to any registered format: quantize, encode, decode.

``quantize(x, fmt, scale)`` returns ``Q(x / scale) * scale`` in x's dtype, where ``Q`` rounds to the
format's grid and ``x / scale`` is evaluated in the working float. The arithmetic is float32 (float64
for float64 inputs, and for formats whose range does not fit float32's, e.g. bfloat16 and E8M0),
vectorized, with no host synchronisation.

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

How the kernels compute this (one float add and subtract for nearest, the working float's own
subnormals for stochastic) is in ``_engine``; ``reference.round_value`` is the same rounding on one
Python float, the readable specification the kernels are tested against.

Overflow (``overflow=``), for magnitudes above max_finite after rounding and for +-inf inputs:
``"saturate"`` (default, +-max_finite), ``"inf"`` (formats with inf), ``"nan"`` (formats with NaN).
NaN in gives NaN out always. -0 keeps its sign where the format has -0 (not in fnuz formats).
A format without zero (E8M0) maps 0 to NaN and tiny values to its smallest value; an unsigned
format maps negative values to NaN (both as ml_dtypes does).

The gradient is straight-through; ``mask_saturated_grad=True`` zeroes it where |x / scale|
exceeded max_finite.

``quantize(..., compiled=True)`` gives the same results bit for bit through ``torch.compile`` (one
fused pass; optional, it needs a working inductor backend). Inside a model compiled by the caller,
``quantize`` traces as one piece with no host synchronisation.

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

import math
from typing import Literal

import torch

from . import _engine
from .formats import FloatFormat, get_format
from .types import ScaleLike

Rounding = Literal["nearest", "stochastic", "toward_zero"]
Overflow = Literal["saturate", "inf", "nan"]
ROUNDING_MODES: tuple[str, ...] = ("nearest", "stochastic", "toward_zero")
OVERFLOW_POLICIES: tuple[str, ...] = ("saturate", "inf", "nan")


def check_scale(scale: ScaleLike, shape: torch.Size | None = None) -> None:
    """The one rule for a scale, everywhere altgrad takes one (quantize, encode, decode, the grid,
    the optimizers): a finite number > 0 (not a bool), or a floating-point tensor that broadcasts to
    ``shape`` (when given). A tensor's values must be finite and > 0 too; they are checked where that
    costs no device sync and no graph break: on the CPU, outside a ``torch.compile`` trace.

    Example::

        >>> check_scale(0.0)
        Traceback (most recent call last):
        ValueError: scale: must be finite and > 0, got 0.0
    """
    if isinstance(scale, torch.Tensor):
        if not scale.is_floating_point():
            raise ValueError(f"scale: expected a floating-point tensor, got {scale.dtype}")
        if shape is not None and scale.dim() > 0:  # a 0-dim scale broadcasts to every shape
            try:
                broadcast = torch.broadcast_shapes(shape, scale.shape)
            except RuntimeError:
                broadcast = None
            if broadcast != shape:
                raise ValueError(
                    f"scale: shape {tuple(scale.shape)} does not broadcast to x's shape {tuple(shape)}"
                )
        if scale.device.type != "cpu" or torch.compiler.is_compiling():
            return
        if scale.dim() == 0:  # one value: one read instead of four tensor ops
            value = float(scale)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"scale: must be finite and > 0, got {[value]}")
            return
        valid = (scale > 0) & torch.isfinite(scale)
        if not bool(valid.all()):
            raise ValueError(f"scale: must be finite and > 0, got {scale[~valid].flatten()[:4].tolist()}")
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale: must be a positive float or a tensor, got {scale!r}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: must be finite and > 0, got {scale!r}")


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


def _prepare(x, format, scale, rounding, overflow) -> tuple[FloatFormat, str]:
    fmt = get_format(format)
    overflow = _check_options(fmt, rounding, overflow)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    check_scale(scale, x.shape)
    return fmt, overflow


def _saturated(x: torch.Tensor, fmt: FloatFormat, scale: ScaleLike) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        scale = scale.to(device=x.device)
    return (x.abs() / scale) > fmt.max_finite


class _QuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, request, generator, mask_saturated_grad):  # type: ignore[override]
        values = _engine.fake_quantize(x, scale, request, generator)
        ctx.mask = _saturated(x.detach(), request.fmt, scale) if mask_saturated_grad else None
        return values

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grad = grad_output if ctx.mask is None else grad_output.masked_fill(ctx.mask, 0.0)
        return grad, None, None, None, None


class _StraightThrough(torch.autograd.Function):
    """``values`` forward, the gradient passed to ``x`` unchanged."""

    @staticmethod
    def forward(ctx, x, values):  # type: ignore[override]
        return values

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        return grad_output, None


def straight_through(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` (computed from ``x`` without autograd) with the straight-through gradient:
    dL/dx = dL/dvalues."""
    return _StraightThrough.apply(x, values) if x.requires_grad else values


def quantize(
    x: torch.Tensor,
    format: str | FloatFormat,
    scale: ScaleLike = 1.0,
    rounding: Rounding = "nearest",
    overflow: Overflow | None = None,
    generator: torch.Generator | None = None,
    mask_saturated_grad: bool = False,
    compiled: bool = False,
) -> torch.Tensor:
    """Fake-quantize: ``Q(x / scale) * scale`` in x's dtype, straight-through gradient.

    ``scale`` is a positive float or a tensor broadcastable to x (per-tensor or per-channel).
    ``compiled=True`` runs the rounding through ``torch.compile``: the same results bit for bit, one
    fused pass. It needs a working inductor backend (a C++ compiler on the CPU, triton on CUDA); the
    first call per format and option set compiles (seconds), shapes are dynamic and float scales are
    passed as tensors, so nothing recompiles after. Formats and inputs that need float64 arithmetic
    (bfloat16, E8M0, float64 inputs; inductor mis-compiles their int64 hash, torch 2.13) and
    stochastic rounding on the CPU (inductor's scalar loops are slower) run the eager kernels.
    """
    fmt, overflow = _prepare(x, format, scale, rounding, overflow)
    request = _engine.Request(fmt, rounding, overflow, out_dtype=x.dtype, compiled=compiled)
    return _QuantizeSTE.apply(x, scale, request, generator, mask_saturated_grad)


def quantize_compiled(
    x: torch.Tensor,
    format: str | FloatFormat,
    scale: ScaleLike = 1.0,
    rounding: Rounding = "nearest",
    overflow: Overflow | None = None,
    generator: torch.Generator | None = None,
    mask_saturated_grad: bool = False,
) -> torch.Tensor:
    """``quantize(..., compiled=True)``; kept for code written against earlier versions."""
    return quantize(x, format, scale, rounding, overflow, generator, mask_saturated_grad, compiled=True)


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
        request = _engine.Request(fmt, rounding, overflow, multiply_back=False)
        codes, any_nan = _engine.fake_quantize_codes(x, scale, request, generator)
    if check_nan and any_nan is not None and bool(any_nan):
        raise ValueError(f"x: NaN has no code in {fmt.name} (specials={fmt.specials!r})")
    return codes


def decode(codes: torch.Tensor, format: str | FloatFormat, scale: ScaleLike = 1.0) -> torch.Tensor:
    """Float32 values of integer codes (a table lookup), multiplied by ``scale``."""
    fmt = get_format(format)
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes: expected an integer tensor, got {getattr(codes, 'dtype', type(codes))}")
    check_scale(scale, codes.shape)
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
