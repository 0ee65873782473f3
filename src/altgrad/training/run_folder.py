"""Run folders that are never silently replaced, and the messages that say how to go on.

A folder "holds a run" when it has any of a run's records (``config.yaml``, ``metrics.jsonl``,
``events.jsonl``, ``summary.json``) or a checkpoint. A fresh run under that name is refused unless
the caller asks to overwrite; the refusal names the folder and the three ways on. The matrix runner
applies the same rule: a folder made by the same config is resumed, one made by another is refused.

Example::

    >>> refuse_existing_run(Path("runs/default"), overwrite=False)   # doctest: +SKIP
    RunExistsError: runs/default already holds a run; continue it with `altgrad train --resume ...`
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from .checkpoint import checkpoint_steps
from .config import ConfigError
from .loggers import WANDB_ID_FILE

RECORDS = ("config.yaml", "metrics.jsonl", "events.jsonl", "summary.json")


class RunExistsError(ConfigError):
    """A fresh run was asked for under a name that already holds a run."""


def resume_command(run_dir: Path) -> str:
    """The command line that continues the run in ``run_dir``."""
    return f"altgrad train --resume {shlex.quote(str(run_dir))}"


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` has any record or checkpoint of a run."""
    return any((run_dir / name).exists() for name in RECORDS) or bool(
        checkpoint_steps(run_dir / "checkpoints")
    )


def refuse_existing_run(run_dir: Path, overwrite: bool) -> None:
    """Raise RunExistsError when ``run_dir`` holds a run and ``overwrite`` is False."""
    if not overwrite and holds_run(run_dir):
        raise RunExistsError(
            f"{run_dir} already holds a run; continue it with `{resume_command(run_dir)}`, give this run "
            "another name (--set name=...), or replace it with --overwrite"
        )


def start_fresh(run_dir: Path) -> None:
    """Create ``run_dir`` and remove an overwritten run's records and checkpoints."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in RECORDS:
        (run_dir / name).unlink(missing_ok=True)
    for step in checkpoint_steps(run_dir / "checkpoints"):
        (run_dir / "checkpoints" / f"step_{step}.pt").unlink()
    (run_dir / WANDB_ID_FILE).unlink(missing_ok=True)  # a new run gets a new W&B run
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)  # not the old run's curves beside the new
