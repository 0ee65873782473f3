"""Per-layer statistics of the weights' positions on their grids, for the logged steps.

For each quantized weight ``w`` (format with M mantissa bits at scale s, gradient g) with
``S(w) = grid_spacing(w, format, s)`` (the local ULP, "stiffness") and ``Q`` rounding to nearest::

    stiffness_mean/{name}       mean_i S(w_i)                                   (weight units)
    stiffness_max/{name}        max_i S(w_i)
    grid_alignment/{name}       mean_i |w_i - Q(w_i)| / S(w_i)                  (ULPs, in [0, 0.5] in range)
    grad_stiffness_corr/{name}  Pearson correlation of |g_i| and S(w_i)         (only if g exists)
    bit_position_mean/{name}    mean of ManifoldAdamW's state["bit_position"]   (only if tracked:
    bit_position_std/{name}     its population std (correction=0)               Python API, not the trainer)

``grid_alignment`` is 0 for weights stored on the grid (GridOptim, ``weight_storage="quantized"``) and
about 0.25 for master weights spread uniformly between grid values. ``grad_stiffness_corr`` says
whether the gradient is largest where the grid is coarsest; it is NaN when either side is constant
(e.g. E0M7's uniform grid) -- reported as NaN, not replaced. All values come back with **one** host
sync for all layers together.

Example::

    >>> import torch
    >>> from altgrad.quantization import E4M3
    >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0625, 3.0]))
    >>> w.grad = torch.tensor([0.1, 0.2, 0.3])
    >>> stats = optimizer_statistics(None, lambda p: (E4M3, 1.0), {"fc": w})
    >>> stats["stiffness_max/fc"], stats["grid_alignment/fc"]
    (0.25, 0.1666666716337204)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from altgrad.quantization.grid import grid_spacing
from altgrad.quantization.ops import quantize
from altgrad.record import metric_key
from altgrad.training.optimizer import QuantInfo


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two flat float64 tensors (NaN if either is constant)."""
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (a.square().sum() * b.square().sum()).sqrt()


@torch.no_grad()
def optimizer_statistics(
    optimizer: torch.optim.Optimizer | None,
    quant_info: QuantInfo | None,
    named_parameters: Mapping[str, nn.Parameter] | Iterable[tuple[str, nn.Parameter]],
) -> dict[str, float]:
    """The flat dict of the module docstring for every quantized parameter, with one host sync.

    A parameter's format and scale come from ``optimizer.quantization_of(p)`` when the optimizer is
    one of altgrad's (so a group's ``format=`` is honoured), else from ``quant_info``; parameters
    with neither are skipped. ``optimizer`` may be None (no bit positions then). Call it after
    ``optimizer.step()`` and before ``zero_grad`` to have gradients for the correlation.
    """
    items = named_parameters.items() if isinstance(named_parameters, Mapping) else named_parameters
    lookup = getattr(optimizer, "quantization_of", None)
    keys: list[str] = []
    values: list[torch.Tensor] = []
    for name, p in items:
        info = lookup(p) if lookup is not None else (quant_info(p) if quant_info is not None else None)
        if info is None:
            continue
        fmt, scale = info
        w = p.detach().float()
        spacing = grid_spacing(w, fmt, scale)
        stats = {
            "stiffness_mean": spacing.mean(),
            "stiffness_max": spacing.amax(),
            "grid_alignment": ((w - quantize(w, fmt, scale)).abs() / spacing).mean(),
        }
        if p.grad is not None:
            stats["grad_stiffness_corr"] = _pearson(p.grad.detach().abs().flatten().double(),
                                                    spacing.flatten().double())  # fmt: skip
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        if "bit_position" in state:
            position = state["bit_position"].float()
            stats["bit_position_mean"] = position.mean()
            stats["bit_position_std"] = position.std(correction=0)
        for stat, value in stats.items():
            keys.append(metric_key(stat, name))
            values.append(value.float())
    if not values:
        return {}
    device = values[0].device
    numbers = torch.stack([v.to(device, non_blocking=True) for v in values]).tolist()  # the one sync
    return dict(zip(keys, numbers, strict=True))
