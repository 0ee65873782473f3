"""The run folder: one object owns the files of a run (docs/run_folder.md is the contract).

``RunFolder(path)`` knows the files (``config.yaml``, ``metrics.jsonl``, ``events.jsonl``,
``summary.json``, ``checkpoints/``), whether a run is already there, how a fresh run replaces an old
one, how a resume drops what was logged after its checkpoint, and how checkpoints are written and
read back. Nothing touches the disk until a method is called.

A folder "holds a run" when it has any of a run's records or a checkpoint. A fresh run under that
name is refused unless the caller asks to overwrite; the refusal names the folder and the three ways
on. The matrix runner applies the same rule: a folder made by the same config is resumed, one made by
another is refused.

Example::

    >>> folder = RunFolder(Path("runs/default"))
    >>> folder.refuse_existing(overwrite=False)   # doctest: +SKIP
    RunExistsError: runs/default already holds a run; continue it with `altgrad train --resume ...`
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
from pathlib import Path
from typing import Any

from altgrad.jsonio import dumps_strict, write_json_atomic, write_text_atomic

from .checkpoint import checkpoint_steps, load_latest_valid, save_checkpoint
from .config import ConfigError, RunConfig, save_config
from .loggers import WANDB_ID_FILE

RECORDS = ("config.yaml", "metrics.jsonl", "events.jsonl", "summary.json")


class RunExistsError(ConfigError):
    """A fresh run was asked for under a name that already holds a run."""


def resume_command(run_dir: Path) -> str:
    """The command line that continues the run in ``run_dir``."""
    return f"altgrad train --resume {shlex.quote(str(run_dir))}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (a torn last line is skipped; a missing file has none)."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


class RunFolder:
    """The files of the run in ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.events = self.path / "events.jsonl"
        self.summary = self.path / "summary.json"
        self.checkpoints = self.path / "checkpoints"

    def holds_run(self) -> bool:
        """Whether the folder has any record or checkpoint of a run."""
        records = any((self.path / name).exists() for name in RECORDS)
        return records or bool(checkpoint_steps(self.checkpoints))

    def refuse_existing(self, overwrite: bool) -> None:
        """Raise RunExistsError when the folder holds a run and ``overwrite`` is False."""
        if not overwrite and self.holds_run():
            raise RunExistsError(
                f"{self.path} already holds a run; continue it with `{resume_command(self.path)}`, give this "
                "run another name (--set name=...), or replace it with --overwrite"
            )

    def start_fresh(self) -> None:
        """Create the folder and remove an overwritten run's records, checkpoints, W&B id and TensorBoard
        events (files of the user's own are kept)."""
        self.path.mkdir(parents=True, exist_ok=True)
        for name in RECORDS:
            (self.path / name).unlink(missing_ok=True)
        for step in checkpoint_steps(self.checkpoints):
            (self.checkpoints / f"step_{step}.pt").unlink()
        (self.path / WANDB_ID_FILE).unlink(missing_ok=True)  # a new run gets a new W&B run
        shutil.rmtree(self.path / "tensorboard", ignore_errors=True)  # not the old curves beside the new

    def truncate_after(self, step: int) -> None:
        """Keep only the metrics and events up to ``step`` (a resume from that step replays the rest)."""
        for path in (self.metrics, self.events):
            kept = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
            write_text_atomic(path, "".join(dumps_strict(r) + "\n" for r in kept))

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics)

    def read_events(self) -> list[dict[str, Any]]:
        return read_jsonl(self.events)

    def write_config(self, config: RunConfig) -> None:
        save_config(config, self.config)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.summary, summary)

    def read_summary(self) -> dict[str, Any] | None:
        """summary.json, or None when it is missing or unreadable."""
        try:
            return json.loads(self.summary.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def save_checkpoint(self, step: int, state: dict[str, Any], keep: int) -> None:
        save_checkpoint(self.checkpoints, step, state, keep)

    def load_latest_checkpoint(self) -> tuple[dict[str, Any], list[str]]:
        """The newest readable checkpoint's state and one warning per newer one skipped as unreadable."""
        _, state, skipped = load_latest_valid(self.checkpoints)
        return state, skipped
