"""``train.compile``: the training step's model through ``torch.compile`` (nanoGPT's default), or as is.

Quantization traces without host syncs (``altgrad.quantization.ops``), so a quantized GPT compiles into
a few graphs; what still breaks is each gradient quantizer, which records the gradient's amax in its
history during the backward (a side effect ``torch.compile`` does not trace). The quantized layers give
the same bits compiled as eager; inductor's own fused fp32 kernels (layer norm, softmax, their
backwards) round differently from eager in the last bits, for an fp32 model too.

Example::

    >>> step_model = maybe_compile(model, config)   # the model itself unless config.train.compile
"""

from __future__ import annotations

import torch
from torch import nn

from altgrad.training.config import RunConfig


def maybe_compile(model: nn.Module, config: RunConfig) -> nn.Module:
    """``torch.compile(model)`` (sharing its Parameters) when ``config.train.compile``, else ``model``."""
    return torch.compile(model) if config.train.compile else model
