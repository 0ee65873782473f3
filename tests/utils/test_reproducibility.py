"""Seeding and RNG-state helpers of ``altgrad.utils`` (the original AltGrad's names)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from altgrad.utils import (
    create_reproducible_dataloader,
    get_rng_state,
    seed_worker,
    set_rng_state,
    set_seed_for_reproducibility,
)


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


@pytest.fixture
def _restore_determinism():
    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def test_same_seed_same_draws_from_every_rng(_restore_determinism) -> None:
    set_seed_for_reproducibility(42)
    first = _draws()
    set_seed_for_reproducibility(42)
    assert _draws() == first
    set_seed_for_reproducibility(43)
    assert _draws() != first
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    with pytest.raises(ValueError, match="seed"):
        set_seed_for_reproducibility("42")  # type: ignore[arg-type]


def test_rng_state_round_trip() -> None:
    set_seed_for_reproducibility(0, deterministic=False)
    state = get_rng_state()
    first = _draws()
    set_rng_state(state)
    assert _draws() == first


def test_reproducible_dataloader_order_depends_only_on_the_seed() -> None:
    data = torch.arange(40.0)

    def order(seed: int) -> list[float]:
        return torch.cat(list(create_reproducible_dataloader(data, batch_size=8, seed=seed))).tolist()

    torch.manual_seed(1)
    a = order(7)
    torch.manual_seed(2)  # the global generator does not matter
    assert order(7) == a and sorted(a) == data.tolist()
    assert order(8) != a


def test_seed_worker_seeds_numpy_and_python_from_torch() -> None:
    torch.manual_seed(123)
    seed_worker(0)
    got = (random.random(), float(np.random.rand()))
    random.seed(123)
    np.random.seed(123)
    assert got == (random.random(), float(np.random.rand()))
