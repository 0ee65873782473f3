"""Atomic, resumable checkpoints: ``checkpoints/step_<N>.pt``, the last ``keep`` kept.

A checkpoint is written to a temporary file in the same folder and renamed into place, so a crash
never leaves a half-written ``step_<N>.pt``. It holds whatever the trainer puts in the state dict:
model, optimizer, amax histories, tracker counts, data sampler position and every RNG.

Example::

    >>> save_checkpoint(run_dir / "checkpoints", step=100, state=trainer_state, keep=2)
    >>> state = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    >>> path, state, skipped = load_latest_valid(run_dir / "checkpoints")  # corrupt newer ones skipped
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NAME = re.compile(r"^step_(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from: Python, NumPy, torch CPU and CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in ``folder``, ascending."""
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name)))


def latest_checkpoint(folder: Path) -> Path | None:
    steps = checkpoint_steps(folder)
    return folder / f"step_{steps[-1]}.pt" if steps else None


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` atomically as ``step_<step>.pt`` and delete all but the newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step_{step}.pt"
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".step_{step}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    for old in checkpoint_steps(folder)[:-keep]:
        (folder / f"step_{old}.pt").unlink(missing_ok=True)
    return target


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


class CheckpointError(ValueError):
    """No checkpoint in a folder can be read."""


def load_latest_valid(folder: Path) -> tuple[Path, dict[str, Any], list[str]]:
    """The newest checkpoint in ``folder`` that loads: ``(path, state, skipped)``.

    ``skipped`` says, one line per file, which newer checkpoint could not be read and why (a
    truncated or corrupt file, e.g. a disk that filled up). Raises CheckpointError naming every
    file when none loads, FileNotFoundError when there is none.
    """
    steps = checkpoint_steps(folder)
    if not steps:
        raise FileNotFoundError(f"no checkpoint to resume from in {folder}")
    skipped = []
    for step in reversed(steps):
        path = folder / f"step_{step}.pt"
        try:
            state = load_checkpoint(path)
        except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
            skipped.append(f"skipped {path}: unreadable ({type(error).__name__}: {_first_line(error)})")
            continue
        if not isinstance(state, dict) or state.get("step") != step:
            skipped.append(f"skipped {path}: not a step_{step} training checkpoint")
            continue
        return path, state, skipped
    names = ", ".join(f"step_{step}.pt" for step in steps)
    raise CheckpointError(f"no readable checkpoint in {folder} (tried {names}: all corrupt or truncated)")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"
