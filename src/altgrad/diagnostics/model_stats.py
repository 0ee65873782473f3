"""Per-parameter training statistics for the metrics log: gradient norms, dead rows, rank health.

Both functions return flat ``{key: float}`` dicts with the run folder's key names and read the device
once for the whole model (per-parameter values are stacked, then ``.tolist()``).

    grad_norm_l2/{param}       ||g||_2
    grad_norm_linf/{param}     max |g|
    dead_neuron_frac/{param}   fraction of output rows (dim 0) whose gradient is below 1e-8 everywhere
    stable_rank/{param}, effective_rank/{param}, spectral_norm/{param}   (2+-dim parameters)

Example::

    loss.backward()
    record = compute_gradient_stats(model)   # {'grad_norm_l2/h.0.attn.c_attn.weight': 0.31, ...}
    record |= compute_rank_stats(model)      # every few hundred steps: one SVD-class call per shape
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from altgrad.record import aggregate_key, metric_key

from .rank_health import compute_rank_metrics, rank_tracked_parameters

DEAD_GRAD_THRESHOLD = 1e-8
"""A row whose gradient is below this in absolute value everywhere counts as dead."""


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _min(values: list[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else min(values)


def _max(values: list[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def compute_gradient_stats(model: nn.Module) -> dict[str, float]:
    """L2 and L-inf gradient norms and the dead-row fraction of every parameter with a gradient.

    Rows are dim 0 (a Linear's output features, an Embedding's tokens; each element of a bias).
    Aggregates over parameters: ``grad_norm_l2/mean``, ``grad_norm_l2/min``, ``grad_norm_linf/max``,
    ``dead_neuron_frac/mean``. Parameters without a gradient are left out; with none, ``{}``.
    Computed in float32 whatever the gradient dtype; one host sync.
    """
    names, rows = [], []
    for name, p in model.named_parameters():
        if p.grad is None or p.numel() == 0:
            continue
        grad = p.grad.detach()
        grad = grad.to_dense() if grad.is_sparse else grad
        row_max = grad.abs().reshape(grad.shape[0] if grad.ndim else 1, -1).amax(dim=1)
        l2 = torch.linalg.vector_norm(grad, 2, dtype=torch.float32)
        dead = (row_max < DEAD_GRAD_THRESHOLD).float().mean()
        rows.append(torch.stack([l2, row_max.max().float(), dead]))
        names.append(name)
    if not names:
        return {}
    device = rows[0].device
    values = torch.stack([row.to(device) for row in rows]).tolist()
    stats: dict[str, float] = {}
    for name, (l2, linf, dead) in zip(names, values, strict=True):
        stats[metric_key("grad_norm_l2", name)] = l2
        stats[metric_key("grad_norm_linf", name)] = linf
        stats[metric_key("dead_neuron_frac", name)] = dead
    l2s, linfs, deads = (list(column) for column in zip(*values, strict=True))
    stats[aggregate_key("grad_norm_l2", "mean")] = _mean(l2s)
    stats[aggregate_key("grad_norm_l2", "min")] = _min(l2s)
    stats[aggregate_key("grad_norm_linf", "max")] = _max(linfs)
    stats[aggregate_key("dead_neuron_frac", "mean")] = _mean(deads)
    return stats


def compute_rank_stats(model: nn.Module) -> dict[str, float]:
    """``stable_rank/{param}``, ``effective_rank/{param}``, ``spectral_norm/{param}`` of every 2+-dim
    parameter (tied ones once), plus ``stable_rank/mean``, ``stable_rank/min``, ``effective_rank/mean``,
    ``effective_rank/min``. Float64 singular values batched by shape (``compute_rank_metrics``);
    one host sync. A model with no matrix gives ``{}``.
    """
    return rank_stats(compute_rank_metrics(rank_tracked_parameters(model)))


def rank_stats(ranks: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Per-layer rank metrics (``{param: {metric: value}}``, e.g. from ``RankHealthMonitor``) as flat
    ``{metric}/{param}`` keys plus the ``/mean`` and ``/min`` aggregates of stable and effective rank."""
    if not ranks:
        return {}
    stats: dict[str, float] = {}
    for name, metrics in ranks.items():
        for metric, value in metrics.items():
            stats[metric_key(metric, name)] = value
    for metric in ("stable_rank", "effective_rank"):
        values = [metrics[metric] for metrics in ranks.values()]
        stats[aggregate_key(metric, "mean")] = _mean(values)
        stats[aggregate_key(metric, "min")] = _min(values)
    return stats
