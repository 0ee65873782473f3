"""Metric sinks: JSONL (always, the source of truth), W&B and TensorBoard (optional).

Every record carries the global ``step``; all sinks get the same keys at the same steps. JSONL lines
are flushed as written, so a crash loses at most the line being written (readers skip a torn last
line); a non-finite float is written as ``null`` (strict JSON). W&B defaults to disabled and never
needs the network in ``offline`` mode.

On clusters: a W&B run is put in ``logging.wandb_group`` (a matrix cell: the matrix's name) with
``logging.wandb_tags`` (a cell: its ``key=value`` settings) and the whole config; its id is kept in
``run_dir/wandb_id.txt`` and a resumed run continues that W&B run (``resume="allow"``; W&B ignores
the replayed steps it already holds). A resumed TensorBoard writer purges the events after the
checkpoint's step (``purge_step``), so replayed steps are not doubled. ``StepProgress`` is a tqdm bar
on a terminal and plain lines in a log file.

Example::

    >>> logger = MetricsLogger.for_run(run_dir, wandb="disabled", tensorboard=False)
    >>> logger.log({"step": 1, "train_loss": 4.2})
    >>> logger.event(step=1, kind="rank_warning", message="WARN ...", layer="lm_head")
    >>> logger.close()
"""

from __future__ import annotations

import math
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

from tqdm.auto import tqdm

from altgrad.jsonio import dumps_strict, write_text_atomic

WANDB_ID_FILE = "wandb_id.txt"


class JsonlWriter:
    """Append one JSON object per line and flush it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(dumps_strict(record) + "\n")  # strict JSON: a non-finite float is null
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class MetricSink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class WandbSink:
    """Weights & Biases, ``offline`` or ``online``; imported only when asked for. A fresh run gets a
    new id, written to ``run_dir/wandb_id.txt``; a resumed one (``resume``) reuses the id found there."""

    def __init__(
        self,
        run_dir: Path,
        mode: str,
        project: str,
        name: str,
        config: dict[str, Any],
        group: str | None = None,
        tags: Sequence[str] = (),
        resume: bool = False,
    ) -> None:
        try:
            import wandb
        except ImportError:
            raise ValueError(
                "logging.wandb is not 'disabled' but wandb is not installed: pip install 'altgrad[wandb]'"
            ) from None
        os.environ.setdefault("WANDB_SILENT", "true")
        id_path = run_dir / WANDB_ID_FILE
        run_id = id_path.read_text().strip() if resume and id_path.is_file() else secrets.token_hex(6)
        write_text_atomic(id_path, run_id + "\n")
        self.run = wandb.init(
            project=project, name=name, dir=str(run_dir), mode=mode, config=config, group=group,
            tags=list(tags) or None, id=run_id, resume="allow",
        )  # fmt: skip

    def log(self, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink:
    """TensorBoard scalars under ``run_dir/tensorboard``; ``purge_step``: drop the events logged
    at that step and later by an earlier session (a resume replays them)."""

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError(
                "logging.tensorboard is on but tensorboard is missing: pip install 'altgrad[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class MetricsLogger:
    """Fan-out of metric records to every sink, plus the run's event log."""

    def __init__(self, run_dir: Path, sinks: list[MetricSink]) -> None:
        self.run_dir = run_dir
        self.metrics = JsonlWriter(run_dir / "metrics.jsonl")
        self.events = JsonlWriter(run_dir / "events.jsonl")
        self.sinks = sinks

    @classmethod
    def for_run(
        cls,
        run_dir: Path,
        wandb: str = "disabled",
        tensorboard: bool = False,
        project: str = "altgrad",
        config: dict[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> MetricsLogger:
        """The sinks a run asks for; ``config`` is the run's config (``logging.wandb_group`` and
        ``logging.wandb_tags`` are read from it); ``resume_step``: the checkpoint step a resume starts at."""
        config = config or {}
        logging = config.get("logging", {})
        resumed = resume_step is not None
        sinks: list[MetricSink] = []
        if wandb != "disabled":
            group, tags = logging.get("wandb_group"), logging.get("wandb_tags") or []
            sinks.append(WandbSink(run_dir, wandb, project, run_dir.name, config, group, tags, resumed))
        if tensorboard:
            sinks.append(TensorBoardSink(run_dir, purge_step=resume_step + 1 if resumed else None))
        return cls(run_dir, sinks)

    def log(self, record: dict[str, Any]) -> None:
        if "step" not in record:
            raise ValueError("every metrics record needs a 'step'")
        self.metrics.write(record)
        for sink in self.sinks:
            sink.log(record)

    def event(self, step: int, kind: str, message: str, **fields: Any) -> dict[str, Any]:
        record = {"step": step, "kind": kind, "message": message, **fields}
        self.events.write(record)
        return record

    def close(self) -> None:
        self.metrics.close()
        self.events.close()
        for sink in self.sinks:
            sink.close()


class StepProgress:
    """The run's progress on stderr: a tqdm bar on a terminal; when stderr is not a terminal (a
    Slurm log, a pipe), one plain line at every step that is a multiple of ``interval`` (the trainer
    passes ``train.log_interval``) and at the last step::

        default step 40/300 loss 2.9130 tok/s 5120 stall 0.912

    ``enabled=False`` shows nothing. Example::

        >>> progress = StepProgress("default", total=300, initial=0, enabled=True, interval=10)
        >>> progress.show(10, {"train_loss": 2.9, "tokens_per_s": 5120.0})
        >>> progress.close()
    """

    def __init__(
        self, name: str, total: int, initial: int, enabled: bool, interval: int, stream: TextIO | None = None
    ) -> None:
        self.name, self.total, self.interval = name, total, interval
        self.stream = stream or sys.stderr
        self.plain = enabled and not self.stream.isatty()
        self.bar = tqdm(total=total, initial=initial, disable=not enabled or self.plain, desc=name,
                        dynamic_ncols=True, file=self.stream)  # fmt: skip

    def show(self, step: int, record: dict[str, Any]) -> None:
        """Report a logged step's loss, throughput and mean stall ratio."""
        loss, speed = record["train_loss"], record["tokens_per_s"]
        stall = record.get("stall_ratio/mean", math.nan)
        if self.plain:
            if step % self.interval == 0 or step == self.total:
                figures = f"loss {loss:.4f} tok/s {speed:.0f} stall {stall:.3f}"
                print(f"{self.name} step {step}/{self.total} {figures}", file=self.stream, flush=True)
            return
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{speed:.0f}", stall=f"{stall:.3f}")

    def close(self) -> None:
        self.bar.close()
