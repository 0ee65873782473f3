"""Predicted vs measured bit stall of one optimizer step, and how far the weights moved on the grid.

The prediction is ``1 - mean P(cross)`` over the weights that got an update, with
``P(cross) = min(1, |dw| / ulp)`` (``altgrad.quantization.grid``); the measurement is the fraction whose
quantized value did not change.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from altgrad.quantization.formats import FloatFormat, get_format
from altgrad.quantization.grid import _update_in_ulps, grid_position
from altgrad.quantization.ops import check_scale, encode
from altgrad.quantization.types import FormatLike, ScaleLike

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
        check_scale(scale)
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
        check_scale(scale)
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
