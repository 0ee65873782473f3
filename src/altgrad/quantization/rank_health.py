"""The original AltGrad's import path of rank health (now ``altgrad.diagnostics.rank_health``)."""

from altgrad.diagnostics.rank_health import (
    DEFAULT_MAX_MATRIX_ELEMENTS,
    METHODS,
    QUANTIZED_SUFFIX,
    RANK_METRICS,
    RankHealthMonitor,
    RankTrendDetector,
    compute_effective_rank,
    compute_rank_metrics,
    compute_stable_rank,
    forward_weights,
    rank_metrics_from_singular_values,
    rank_tracked_parameters,
    singular_values,
)

__all__ = [
    "DEFAULT_MAX_MATRIX_ELEMENTS",
    "METHODS",
    "QUANTIZED_SUFFIX",
    "RANK_METRICS",
    "RankHealthMonitor",
    "RankTrendDetector",
    "compute_effective_rank",
    "compute_rank_metrics",
    "compute_stable_rank",
    "forward_weights",
    "rank_metrics_from_singular_values",
    "rank_tracked_parameters",
    "singular_values",
]
