"""The two argument types every numerics function takes: a format and a scale.

Example::

    >>> from altgrad.quantization.types import FormatLike, ScaleLike
    >>> def spacing(format: FormatLike, scale: ScaleLike = 1.0) -> float: ...
"""

from __future__ import annotations

import torch

from .formats import FloatFormat

FormatLike = str | FloatFormat
"""A format, or a name ``get_format`` knows (``"E4M3"``, ``"e3m4:bias=1"``)."""

ScaleLike = float | torch.Tensor
"""A scale: a positive number, or a tensor broadcastable to the quantized tensor."""
