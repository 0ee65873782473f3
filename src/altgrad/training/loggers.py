"""Metric sinks: JSONL (always, the source of truth), W&B and TensorBoard (optional).

Every record carries the global ``step``; all sinks get the same keys at the same steps. JSONL lines
are flushed as written, so a crash loses at most the line being written (readers skip a torn last
line); a non-finite float is written as ``null`` (strict JSON). W&B defaults to disabled and never
needs the network in ``offline`` mode.

Example::

    >>> logger = MetricsLogger.for_run(run_dir, wandb="disabled", tensorboard=False)
    >>> logger.log({"step": 1, "train_loss": 4.2})
    >>> logger.event(step=1, kind="rank_warning", message="WARN ...", layer="lm_head")
    >>> logger.close()
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from altgrad.jsonio import dumps_strict


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
    """Weights & Biases, ``offline`` or ``online``; imported only when asked for."""

    def __init__(self, run_dir: Path, mode: str, project: str, name: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ValueError(
                "logging.wandb is not 'disabled' but wandb is not installed: pip install 'altgrad[wandb]'"
            ) from None
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=project, name=name, dir=str(run_dir), mode=mode, config=config)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink:
    """TensorBoard scalars under ``run_dir/tensorboard``."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError(
                "logging.tensorboard is on but tensorboard is missing: pip install 'altgrad[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

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
    ) -> MetricsLogger:
        sinks: list[MetricSink] = []
        if wandb != "disabled":
            sinks.append(WandbSink(run_dir, wandb, project, run_dir.name, config or {}))
        if tensorboard:
            sinks.append(TensorBoardSink(run_dir))
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
