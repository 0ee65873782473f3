"""Seed every RNG a run draws from, seed DataLoader workers, and save/restore RNG state.

``set_seed_for_reproducibility(seed)`` seeds Python's ``random``, NumPy's global generator and torch
(CPU and every CUDA device) and, with ``deterministic=True``, asks torch for deterministic kernels
(cuDNN deterministic, no benchmark autotuning, ``CUBLAS_WORKSPACE_CONFIG``, and
``torch.use_deterministic_algorithms(True, warn_only=True)``: an op without a deterministic kernel
warns instead of failing). ``get_rng_state`` / ``set_rng_state`` are the checkpoint's own helpers.

Example::

    >>> import torch
    >>> set_seed_for_reproducibility(42, deterministic=False)
    >>> a = torch.randn(3)
    >>> set_seed_for_reproducibility(42, deterministic=False)
    >>> bool((a == torch.randn(3)).all())
    True
"""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from altgrad.training.checkpoint import rng_state as get_rng_state
from altgrad.training.checkpoint import set_rng_state

__all__ = [
    "create_reproducible_dataloader",
    "get_rng_state",
    "seed_everything",
    "seed_worker",
    "set_rng_state",
    "set_seed_for_reproducibility",
]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_seed_for_reproducibility(seed: int, deterministic: bool = True) -> None:
    """``seed_everything(seed)``; ``deterministic`` also selects deterministic kernels."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    seed_everything(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.use_deterministic_algorithms(True, warn_only=True)


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=seed_worker)``: seed a worker's Python and NumPy RNGs from torch's
    per-worker seed (torch seeds itself in each worker; the other two would repeat across workers)."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def create_reproducible_dataloader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_workers: int = 0,
    **kwargs: Any,
) -> DataLoader:
    """A DataLoader whose order depends only on ``seed``: a seeded generator for shuffling (and for the
    workers' base seed) and ``seed_worker`` in each worker. Extra ``kwargs`` go to ``DataLoader``."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=generator,
        **kwargs,
    )
