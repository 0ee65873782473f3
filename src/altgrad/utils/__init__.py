"""Seeding and RNG-state helpers (the original AltGrad's ``altgrad.utils``; docs/compat.md)."""

from .reproducibility import (
    create_reproducible_dataloader,
    get_rng_state,
    seed_everything,
    seed_worker,
    set_rng_state,
    set_seed_for_reproducibility,
)

__all__ = [
    "create_reproducible_dataloader",
    "get_rng_state",
    "seed_everything",
    "seed_worker",
    "set_rng_state",
    "set_seed_for_reproducibility",
]
