"""Grid diagnostics: the local grid spacing (ULP) of a format, and the predicted vs measured bit stall.

An update ``dw`` to a weight ``w`` changes its quantized value only if it carries ``w`` across a
rounding boundary. Rounding to nearest puts the boundaries one grid step apart (halfway between grid
values), so a master weight whose position within its grid cell is uniform crosses one with
probability ``min(1, |dw| / ulp)``, the ulp taken at ``w`` in the direction of motion (below a power
of two the spacing is half the one above)::

    ulp(x) = scale * 2^(max(floor(log2|x / scale|), emin) - M)      (E0M7: scale * 2^(emin - M), uniform)
    P(cross) = min(1, |dw| / ulp(w towards w + dw))
    predicted stall = 1 - mean P(cross)    over the weights that got an update

The prediction is exact within a binade (boundaries evenly spaced) and approximate where a step
crosses a binade edge. ``BitStallDetector`` measures, for one optimizer step, that predicted stall
next to the *measured* one (the quantized value did not change) and how many grid positions each
weight moved.

Example::

    >>> import torch
    >>> from altgrad.quantization import E4M3, grid_spacing
    >>> grid_spacing(torch.tensor([1.0, 1.5, 0.01, 0.0]), E4M3)
    tensor([0.1250, 0.1250, 0.0020, 0.0020])
    >>> crossing_probability(torch.tensor([1.0, 1.0, 1.3]), torch.tensor([-0.03125, 0.03125, 0.5]), E4M3)
    tensor([0.5000, 0.2500, 1.0000])
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from .formats import FloatFormat, get_format
from .ops import encode

ScaleLike = float | torch.Tensor
FormatLike = str | FloatFormat


def _check_scale(scale: ScaleLike) -> None:
    if isinstance(scale, torch.Tensor):
        return  # checked by the quantizer where it matters; a device tensor cannot be checked without a sync
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: must be finite and > 0, got {scale!r}")


def grid_spacing(x: torch.Tensor, format: FormatLike, scale: ScaleLike = 1.0) -> torch.Tensor:
    """The format's local grid spacing (ULP) at each element of ``x``, in x's units.

    ``scale * 2^(e - M)`` with ``e = floor(log2|x / scale|)`` clamped to ``[emin, emax]``: zero and
    subnormal values get the subnormal spacing, values beyond the range the top binade's. Formats with
    no exponent bits (E0M7) have one uniform spacing. NaN gives NaN. Float32 result (float64 for
    float64 input), exact powers of two times ``scale``; vectorized, no host sync.
    """
    fmt = get_format(format)
    _check_scale(scale)
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
    _check_scale(scale)
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


HISTOGRAM_EDGES: tuple[int, ...] = (0, 1, 2, 4, 8, 16)
"""Default bins of grid steps moved: 0, 1, 2-3, 4-7, 8-15, 16+."""


def _bin_labels(edges: tuple[int, ...]) -> list[str]:
    labels = []
    for low, high in zip(edges, edges[1:] + (None,), strict=True):
        if high is None:
            labels.append(f"{low}+")
        elif high == low + 1:
            labels.append(str(low))
        else:
            labels.append(f"{low}-{high - 1}")
    return labels


@dataclass
class StallStatistics:
    """One step's stall and grid-movement statistics, as 0-dim tensors (no host sync until ``to_dict``).

    ``elements``: weights considered. ``predicted_stall``: ``1 - mean(min(1, |dw| / ulp))``, the
    expected fraction that stays in its grid cell (module docstring). ``measured_stall``: fraction
    whose quantized value did not change (moved 0 grid positions). ``ulps_mean``/``ulps_median``:
    update size in units of the local spacing in the direction of motion, ``|dw| / ulp``.
    ``grid_steps_mean``/``grid_steps_median``: grid positions moved. ``histogram``: counts of grid
    positions moved per bin of ``histogram_edges`` (``[e_i, e_{i+1})``, the last bin open). Every
    statistic is NaN when no element was considered.
    """

    elements: torch.Tensor
    predicted_stall: torch.Tensor
    measured_stall: torch.Tensor
    ulps_mean: torch.Tensor
    ulps_median: torch.Tensor
    grid_steps_mean: torch.Tensor
    grid_steps_median: torch.Tensor
    histogram: torch.Tensor
    histogram_edges: tuple[int, ...] = HISTOGRAM_EDGES

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Plain floats with one host sync: the scalars, then ``grid_steps_frac/{bin}`` (fraction per bin)."""
        names = ("elements", "predicted_stall", "measured_stall", "ulps_mean", "ulps_median",
                 "grid_steps_mean", "grid_steps_median")  # fmt: skip
        scalars = torch.stack([getattr(self, name).to(torch.float64) for name in names])
        fractions = self.histogram.to(torch.float64) / self.elements.to(torch.float64)
        values = torch.cat([scalars, fractions]).tolist()
        keys = list(names) + [f"grid_steps_frac/{label}" for label in _bin_labels(self.histogram_edges)]
        return {prefix + key: value for key, value in zip(keys, values, strict=True)}


class BitStallDetector:
    """Predicted vs measured stall of one optimizer step, and how far weights moved on the grid.

    Pass the weight before and after the step (a float copy of ``before`` is the caller's, taken only on
    the steps being diagnosed) and, to compare with ``WeightFlipTracker``'s stall ratio, the mask of
    elements that had a gradient (``updated``). Both weights are rounded at the same ``scale``.

    Example::

        detector = BitStallDetector("E4M3", scale=1.0)
        before = w.detach().clone()
        optimizer.step()
        stats = detector.measure(before, w, updated=w.grad.abs() > 1e-10)
        stats.to_dict()   # {'predicted_stall': 0.97, 'measured_stall': 0.98, 'ulps_median': 0.04, ...}
    """

    def __init__(
        self,
        format: FormatLike | None = None,
        scale: ScaleLike = 1.0,
        histogram_edges: tuple[int, ...] = HISTOGRAM_EDGES,
    ) -> None:
        self.format = None if format is None else get_format(format)
        _check_scale(scale)
        self.scale = scale
        edges = tuple(int(edge) for edge in histogram_edges)
        if not edges or edges[0] != 0 or any(b <= a for a, b in itertools.pairwise(edges)):
            raise ValueError(f"histogram_edges: must start at 0 and increase strictly, got {histogram_edges}")
        self.histogram_edges = edges

    def _resolve(self, format: FormatLike | None, scale: ScaleLike | None) -> tuple[FloatFormat, ScaleLike]:
        fmt = self.format if format is None else get_format(format)
        if fmt is None:
            raise ValueError("format: BitStallDetector needs a format (in the constructor or in the call)")
        scale = self.scale if scale is None else scale
        _check_scale(scale)
        return fmt, scale

    def measure(
        self,
        before: torch.Tensor,
        after: torch.Tensor,
        format: FormatLike | None = None,
        scale: ScaleLike | None = None,
        updated: torch.Tensor | None = None,
    ) -> StallStatistics:
        """Statistics of the step ``before -> after`` over all elements, or those where ``updated``."""
        fmt, scale = self._resolve(format, scale)
        if before.shape != after.shape:
            raise ValueError(f"after: shape {tuple(after.shape)} differs from before {tuple(before.shape)}")
        if updated is not None and updated.shape != before.shape:
            raise ValueError(f"updated: shape {tuple(updated.shape)} differs from {tuple(before.shape)}")
        before, after = before.detach().float(), after.detach().float()
        selected = torch.ones_like(before, dtype=torch.bool) if updated is None else updated.bool()
        count = torch.count_nonzero(selected)
        denominator = count.to(torch.float64)

        ulps = _update_in_ulps(before, after - before, fmt, scale)
        moved = (
            grid_position(encode(after, fmt, scale, check_nan=False), fmt)
            - grid_position(encode(before, fmt, scale, check_nan=False), fmt)
        ).abs()

        def mean(values: torch.Tensor) -> torch.Tensor:
            return torch.where(selected, values, 0).sum(dtype=torch.float64) / denominator

        def median(values: torch.Tensor) -> torch.Tensor:
            return torch.nanmedian(torch.where(selected, values.to(torch.float32), math.nan))

        edges = torch.tensor(self.histogram_edges[1:], dtype=moved.dtype, device=moved.device)
        bins = torch.bucketize(moved, edges, right=True)  # bin i holds edges[i] <= moved < edges[i + 1]
        histogram = torch.stack(
            [torch.count_nonzero(selected & (bins == i)) for i in range(len(self.histogram_edges))]
        )
        return StallStatistics(
            elements=count,
            predicted_stall=1 - mean(ulps.clamp(max=1.0)),
            measured_stall=mean(moved == 0),
            ulps_mean=mean(ulps),
            ulps_median=median(ulps),
            grid_steps_mean=mean(moved),
            grid_steps_median=median(moved),
            histogram=histogram,
            histogram_edges=self.histogram_edges,
        )


def __getattr__(name: str) -> object:
    """The original AltGrad's names at the import path it used, defined in ``compat``
    (docs/compat.md): ``detect_bit_stall``, ``compute_stiffness_field``."""
    if name in ("detect_bit_stall", "compute_stiffness_field"):
        from altgrad.quantization import compat

        return getattr(compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
