"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr`` at ``max_steps``.

    lr(step) = lr * step / warmup                                   for step <= warmup
    lr(step) = min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2,      t = (step - warmup) / (max_steps - warmup)

Example::

    >>> cosine_with_warmup(step=10, lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    0.001
"""

from __future__ import annotations

import math


def cosine_with_warmup(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """The learning rate for optimizer step ``step`` (1-based)."""
    if warmup_steps > 0 and step <= warmup_steps:
        return lr * step / warmup_steps
    if max_steps <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
