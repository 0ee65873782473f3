"""The original AltGrad's public names, with their documented meaning and without its numeric bugs.

Ported scripts import these from ``altgrad.quantization`` as before; docs/compat.md lists every name,
what it means here and where altgrad differs from the original (E4M3 max 448, not 480; ties to even;
NaN stays NaN; E3M4 bias 3; stall ratios in [0, 1]).

    FORMAT_REGISTRY                  the eight E/M splits of an 8-bit float by name
    QuantizeFunc.apply(x, fmt, s)    Q(x / s) * s, straight-through gradient (as ``quantize``)
    dequantize(q, s)                 q * s, gradient scaled by s (``DequantizeFunc``)
    ScalingConfig                    history_len and scale_min of delayed scaling
    detect_bit_stall(w, g, lr, ...)  (stalled, total): SGD steps w - lr g that leave Q(w) unchanged
    compute_stiffness_field(w, M)    2^(floor(log2|w|) - M), the smallest update that can move w

Example::

    >>> import torch
    >>> q = QuantizeFunc.apply(torch.tensor([0.3, 500.0]), FORMAT_REGISTRY["E4M3"], torch.tensor(1.0))
    >>> q.tolist(), dequantize(q, torch.tensor(2.0)).tolist()
    ([0.3125, 448.0], [0.625, 896.0])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .formats import E0M7, E1M6, E2M5, E3M4, E4M3, E5M2, E6M1, E7M0, FloatFormat
from .grid import grid_spacing
from .ops import quantize
from .types import ScaleLike

FORMAT_REGISTRY: dict[str, FloatFormat] = {
    fmt.name: fmt for fmt in (E0M7, E1M6, E2M5, E3M4, E4M3, E5M2, E6M1, E7M0)
}
"""The original's registry: E0M7 .. E7M0 by name (E4M3 is OCP E4M3FN, E3M4 has bias 3, max 31)."""


class QuantizeFunc(torch.autograd.Function):
    """``QuantizeFunc.apply(x, format, scale)``: ``Q(x / scale) * scale`` rounded to nearest (ties to
    even, saturating, NaN stays NaN); the backward passes the gradient unchanged (straight-through)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, format: FloatFormat, scale: ScaleLike) -> torch.Tensor:  # type: ignore[override]
        return quantize(x, format, scale)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return grad_output, None, None


class DequantizeFunc(torch.autograd.Function):
    """``DequantizeFunc.apply(q, scale)``: ``q * scale``; the gradient with respect to q is grad * scale."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, scale: ScaleLike) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return q * scale

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad_output * ctx.scale, None


def dequantize(q: torch.Tensor, scale: ScaleLike) -> torch.Tensor:
    """``q * scale`` (the original's meaning): undo the ``x / scale`` of a quantizer. Values, not codes:
    integer codes go through ``decode(codes, format, scale)``."""
    if not isinstance(q, torch.Tensor) or not q.is_floating_point():
        raise ValueError(
            f"q: expected a floating-point tensor of values, got {getattr(q, 'dtype', type(q).__name__)}; "
            "decode integer codes with decode(codes, format, scale)"
        )
    return DequantizeFunc.apply(q, scale)


@dataclass(frozen=True)
class ScalingConfig:
    """Delayed scaling settings: the amax history length and the smallest scale ``compute_scale`` returns."""

    history_len: int = 16
    scale_min: float = 1e-10

    def __post_init__(self) -> None:
        if self.history_len < 1:
            raise ValueError(f"history_len: must be >= 1, got {self.history_len}")
        if not self.scale_min > 0:
            raise ValueError(f"scale_min: must be > 0, got {self.scale_min}")


def detect_bit_stall(
    weight: torch.Tensor, grad: torch.Tensor, lr: float, format: FloatFormat | str, scale: ScaleLike
) -> tuple[int, int]:
    """``(stalled, total)`` for one plain SGD step ``w - lr * grad`` on the quantized grid.

    ``total`` counts weights with a non-zero gradient; ``stalled`` those among them whose quantized
    value ``Q(w / s) * s`` the step leaves unchanged, so ``0 <= stalled <= total`` (a stall ratio
    ``stalled / total`` lies in [0, 1]). One host sync.
    """
    if weight.shape != grad.shape:
        raise ValueError(f"grad: shape {tuple(grad.shape)} differs from the weight's {tuple(weight.shape)}")
    with torch.no_grad():
        before = quantize(weight, format, scale)
        after = quantize(weight - lr * grad, format, scale)
        moving = grad != 0
        unchanged = (before == after) | (before.isnan() & after.isnan())
        counts = torch.stack([(moving & unchanged).sum(), moving.sum()]).tolist()
    return int(counts[0]), int(counts[1])


def compute_stiffness_field(
    weights: torch.Tensor, mantissa_bits: int | FloatFormat | str, scale: ScaleLike = 1.0
) -> torch.Tensor:
    """The grid spacing at each weight: the smallest update that can change it.

    An int ``mantissa_bits`` M gives the original's ``2^(floor(log2|w|) - M)`` (a float with M mantissa
    bits and unbounded exponent; NaN at w = 0; no E0M7 special case, so M = 7 is bfloat16's spacing). A
    format gives its exact spacing ``grid_spacing(weights, format, scale)``: subnormals, the top binade
    and fixed-point formats (E0M7: 1/128 everywhere) included, zero at the subnormal spacing.
    """
    if isinstance(mantissa_bits, (FloatFormat, str)):
        return grid_spacing(weights, mantissa_bits, scale)
    if isinstance(mantissa_bits, bool) or not isinstance(mantissa_bits, int) or mantissa_bits < 0:
        raise ValueError(f"mantissa_bits: a non-negative int or a format, got {mantissa_bits!r}")
    w = weights.detach().float() if weights.dtype != torch.float64 else weights.detach()
    _, exponent = torch.frexp(w)  # |w| = m 2^k with 0.5 <= m < 1: floor(log2|w|) = k - 1
    stiffness = torch.ldexp(torch.ones_like(w), exponent - 1 - mantissa_bits)
    return stiffness.masked_fill(w == 0, torch.nan).masked_fill(~torch.isfinite(w), torch.nan)
