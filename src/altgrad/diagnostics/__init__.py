"""Measurements of a training run: flips and stall, rank health, quantization error, gradient and
optimizer statistics. Each reads tensors and returns numbers; none changes the training."""

from .components import Component, register_component
from .flips import WeightFlipTracker, attach_flip_tracker, compute_flip_rate, compute_stall_ratio
from .rank_health import RankHealthMonitor, RankTrendDetector, compute_effective_rank, compute_stable_rank
from .stall import BitStallDetector

__all__ = [
    "WeightFlipTracker", "attach_flip_tracker", "compute_flip_rate", "compute_stall_ratio",
    "RankHealthMonitor", "RankTrendDetector", "compute_effective_rank", "compute_stable_rank",
    "BitStallDetector", "Component", "register_component",
]  # fmt: skip
