"""The original AltGrad's import path of the flip metrics, now in ``altgrad.diagnostics.flips``."""

from altgrad.diagnostics.flips import (
    COUNT_NAMES,
    UPDATE_THRESHOLD,
    FlipTrackerHooks,
    MissingSnapshotError,
    WeightFlipTracker,
    attach_flip_tracker,
    compute_flip_rate,
    compute_stall_ratio,
    layer_name,
    torch_optimizer,
)

__all__ = [
    "COUNT_NAMES",
    "FlipTrackerHooks",
    "MissingSnapshotError",
    "UPDATE_THRESHOLD",
    "WeightFlipTracker",
    "attach_flip_tracker",
    "compute_flip_rate",
    "compute_stall_ratio",
    "layer_name",
    "torch_optimizer",
]
