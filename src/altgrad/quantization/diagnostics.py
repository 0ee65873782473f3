"""The original AltGrad's import path for the grid and stall diagnostics (docs/compat.md).

Grid numerics live in ``altgrad.quantization.grid``, the stall measurement in
``altgrad.diagnostics.stall``; ``detect_bit_stall`` in ``altgrad.quantization.compat``.
"""

from altgrad.diagnostics.stall import BitStallDetector, StallStatistics

from .compat import compute_stiffness_field, detect_bit_stall
from .grid import crossing_probability, grid_position, grid_spacing

__all__ = ["BitStallDetector", "StallStatistics", "compute_stiffness_field", "crossing_probability",
           "detect_bit_stall", "grid_position",
           "grid_spacing"]  # fmt: skip
