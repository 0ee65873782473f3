"""The format's grid: local spacing (ULP), position of a code on the value line, crossing probability.

An update ``dw`` to a weight ``w`` changes its quantized value only if it carries ``w`` across a
rounding boundary. Rounding to nearest puts the boundaries one grid step apart (halfway between grid
values), so a master weight whose position within its grid cell is uniform crosses one with
probability ``min(1, |dw| / ulp)``, the ulp taken at ``w`` in the direction of motion (below a power
of two the spacing is half the one above)::

    ulp(x) = scale * 2^(max(floor(log2|x / scale|), emin) - M)      (E0M7: scale * 2^(emin - M), uniform)
    P(cross) = min(1, |dw| / ulp(w towards w + dw))
    predicted stall = 1 - mean P(cross)    over the weights that got an update

The prediction is exact within a binade (boundaries evenly spaced) and approximate where a step
crosses a binade edge. ``altgrad.diagnostics.stall.BitStallDetector`` measures, for one optimizer step,
that predicted stall next to the *measured* one (the quantized value did not change).

Example::

    >>> import torch
    >>> from altgrad.quantization import E4M3, grid_spacing
    >>> grid_spacing(torch.tensor([1.0, 1.5, 0.01, 0.0]), E4M3)
    tensor([0.1250, 0.1250, 0.0020, 0.0020])
    >>> crossing_probability(torch.tensor([1.0, 1.0, 1.3]), torch.tensor([-0.03125, 0.03125, 0.5]), E4M3)
    tensor([0.5000, 0.2500, 1.0000])
"""

from __future__ import annotations

import math

import torch

from .formats import get_format
from .ops import check_scale
from .types import FormatLike, ScaleLike


def grid_spacing(x: torch.Tensor, format: FormatLike, scale: ScaleLike = 1.0) -> torch.Tensor:
    """The format's local grid spacing (ULP) at each element of ``x``, in x's units.

    ``scale * 2^(e - M)`` with ``e = floor(log2|x / scale|)`` clamped to ``[emin, emax]``: zero and
    subnormal values get the subnormal spacing, values beyond the range the top binade's. Formats with
    no exponent bits (E0M7) have one uniform spacing. NaN gives NaN. Float32 result (float64 for
    float64 input), exact powers of two times ``scale``; vectorized, no host sync.
    """
    fmt = get_format(format)
    check_scale(scale)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.detach().to(dtype)
    if isinstance(scale, torch.Tensor):
        y = y / scale.to(dtype)
    elif scale != 1:
        y = y / scale
    M = fmt.mantissa_bits
    if fmt.exponent_bits == 0:
        exponent = torch.full_like(y, fmt.emin, dtype=torch.int32)
    else:
        _, frexp_exponent = torch.frexp(y)  # y = m * 2^k with 0.5 <= |m| < 1, so floor(log2|y|) = k - 1
        exponent = (frexp_exponent - 1).clamp_(fmt.emin, fmt.emax)
        exponent = exponent.masked_fill_(y == 0, fmt.emin).masked_fill_(torch.isinf(y), fmt.emax)
    spacing = torch.ldexp(torch.ones_like(y), exponent - M)
    spacing = spacing.masked_fill_(torch.isnan(y), math.nan)
    if isinstance(scale, torch.Tensor):
        return spacing * scale.to(dtype)
    return spacing if scale == 1 else spacing * scale


def _update_in_ulps(
    weight: torch.Tensor, update: torch.Tensor, format: FormatLike, scale: ScaleLike
) -> torch.Tensor:
    """``|dw| / ulp`` with the ulp at ``weight`` in the direction of ``update`` (see crossing_probability).

    The binade comes from the float32 exponent field (frexp and nextafter are 10x slower on CPU): a
    weight exactly at a power of two moving towards zero takes the binade below.
    """
    fmt = get_format(format)
    if weight.shape != update.shape:
        raise ValueError(f"update: shape {tuple(update.shape)} differs from weight {tuple(weight.shape)}")
    check_scale(scale)
    dw = update.detach().float()
    s = scale.float() if isinstance(scale, torch.Tensor) else float(scale)
    y = weight.detach().float() / s
    bits = y.view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 127  # floor(log2|y|) for normal y; zero and subnormals clamp below
    at_power_of_two = (bits & 0x7FFFFF) == 0
    exponent -= (at_power_of_two & (y * dw < 0)).to(torch.int32)
    if fmt.exponent_bits == 0:  # one uniform spacing
        exponent = torch.full_like(exponent, fmt.emin)
    else:
        exponent = exponent.clamp_(fmt.emin, fmt.emax)
    spacing = torch.exp2(exponent.sub_(fmt.mantissa_bits).float())
    return dw.abs() / spacing.mul_(s)


def crossing_probability(
    weight: torch.Tensor, update: torch.Tensor, format: FormatLike, scale: ScaleLike = 1.0
) -> torch.Tensor:
    """Per element, the chance that ``weight + update`` rounds to another grid value: ``min(1, |dw|/ulp)``.

    ``ulp`` is the grid spacing at ``weight`` in the direction of ``update`` (a weight at a power of two
    moving down sees the finer spacing below it). Assumes the weight's position within its grid cell
    is uniform (an fp32 master copy); float32, no host sync.
    """
    return _update_in_ulps(weight, update, format, scale).clamp_(max=1.0)


def grid_position(codes: torch.Tensor, format: FormatLike, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """The signed index of each code's value on the format's value line (+0 and -0 are both 0).

    Sign-magnitude codes are ordered by magnitude within a sign, so ``position = +-(code & magnitude
    bits)``; the difference of two positions is the number of grid steps between the values (inf, where
    the format has it, sits one step above max_finite; NaN codes have no meaningful position). ``dtype``
    (int32 by default; int16 holds differences of <= 8-bit formats) is the result's integer type.
    """
    fmt = get_format(format)
    if codes.is_floating_point():
        raise ValueError(f"codes: expected an integer tensor, got {codes.dtype}")
    magnitude_bits = fmt.exponent_bits + fmt.mantissa_bits
    codes = codes.to(dtype, copy=True)
    magnitude = codes & ((1 << magnitude_bits) - 1)
    if not fmt.signed:
        return magnitude
    sign = codes.bitwise_right_shift_(magnitude_bits).bitwise_and_(1)  # in place: small-int ops are fast
    return sign.mul_(-2).add_(1).mul_(magnitude)
