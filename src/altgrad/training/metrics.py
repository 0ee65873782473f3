"""The original AltGrad's import path of ``compute_rank_stats`` (now ``altgrad.diagnostics.model_stats``)."""

from altgrad.diagnostics.model_stats import (
    DEAD_GRAD_THRESHOLD,
    compute_gradient_stats,
    compute_rank_stats,
    rank_stats,
)

__all__ = [
    "DEAD_GRAD_THRESHOLD",
    "compute_gradient_stats",
    "compute_rank_stats",
    "rank_stats",
]
