"""The original AltGrad's ``altgrad.quantization.advanced_diagnostics`` import path: the one name of it that
altgrad carries over (see docs/compat.md; its grid-alignment and ULP statistics are not carried over,
``BitStallDetector``, ``grid_spacing`` and the flip metrics measure those quantities here).

    >>> from altgrad.quantization.advanced_diagnostics import compute_stiffness_field
"""

from .compat import compute_stiffness_field

__all__ = ["compute_stiffness_field"]
