"""Read run folders (the only interface between training and analysis) into plain Python objects.

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``events.jsonl`` and ``summary.json`` as
documented in ``docs/run_folder.md``. Any of them may be missing or cut short (a crash mid-write):
``load_run`` reads what is there, skips unreadable JSONL lines and says so in ``Run.notes``.

Example::

    >>> run = load_run("runs/e4m3_adamw")                               # doctest: +SKIP
    >>> run.metrics.set_index("step")["train_loss"].iloc[-1]            # doctest: +SKIP
    >>> [r.name for r in map(load_run, find_runs("runs/matrix"))]        # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

RUN_MARKERS = ("config.yaml", "metrics.jsonl")
SKIPPED_DIRS = ("checkpoints", "figures")
NONFINITE_STRINGS = ("nan", "inf", "-inf", "NaN", "Infinity", "-Infinity")
INCOMPLETE = "incomplete"
"""Status of a run folder without summary.json: it crashed, was killed, or is still running."""


@dataclass
class Run:
    """One run folder, read. ``metrics`` has one row per step (sorted), ``events`` one row per event."""

    path: Path
    name: str
    config: dict[str, Any]
    metrics: pd.DataFrame
    events: pd.DataFrame
    summary: dict[str, Any]
    status: str
    notes: list[str] = field(default_factory=list)

    def series(self, column: str) -> pd.Series:
        """``column`` of the metrics indexed by step, missing steps dropped (empty when never recorded)."""
        if column not in self.metrics.columns:
            return pd.Series(dtype=float, name=column)
        values = pd.to_numeric(self.metrics[column], errors="coerce")
        return pd.Series(values.to_numpy(), index=self.metrics["step"].to_numpy(), name=column).dropna()

    def columns(self, prefix: str) -> list[str]:
        """Metric columns starting with ``prefix``, e.g. ``run.columns("stall_ratio/")``."""
        return [column for column in self.metrics.columns if column.startswith(prefix)]

    def events_of(self, kind: str) -> pd.DataFrame:
        """The events of one kind (``rank_warning``, ``nan_stop``, ...), sorted by step."""
        if self.events.empty or "kind" not in self.events.columns:
            return self.events.iloc[0:0]
        return self.events[self.events["kind"] == kind]


def read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; unreadable lines (a crash mid-write) are skipped with a note."""
    if not path.exists():
        notes.append(f"{path.name}: not found")
        return []
    records = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            where = "last line" if number == len(lines) else f"line {number}"
            notes.append(f"{path.name}: {where} is not valid JSON (cut short by a crash?), skipped")
            continue
        if isinstance(record, dict):
            records.append(decode_nonfinite(record))
        else:
            notes.append(f"{path.name}: line {number} is not a JSON object, skipped")
    return records


def decode_nonfinite(record: dict[str, Any]) -> dict[str, Any]:
    """The trainer writes non-finite floats as strings ("nan", "inf", "-inf"); read them back as floats."""
    return {
        key: float(value) if isinstance(value, str) and value in NONFINITE_STRINGS else value
        for key, value in record.items()
    }


def metrics_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per step. Records sharing a step (a resumed run logs steps again) merge; the later wins."""
    records = [record for record in records if isinstance(record.get("step"), int | float)]
    if not records:
        return pd.DataFrame({"step": pd.Series(dtype="int64")})
    frame = pd.DataFrame.from_records(records)
    frame = frame.groupby("step", sort=True).last().reset_index()
    frame["step"] = frame["step"].astype("int64")
    return frame


def events_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Events sorted by step (stable: same-step events keep their order in the file)."""
    frame = pd.DataFrame.from_records(records)
    for column in ("step", "kind", "message"):
        if column not in frame.columns:
            frame[column] = pd.Series(dtype=object)
    frame["step"] = pd.to_numeric(frame["step"], errors="coerce")
    return frame.sort_values("step", kind="stable").reset_index(drop=True)


def _read_yaml(path: Path, notes: list[str]) -> dict[str, Any]:
    if not path.exists():
        notes.append(f"{path.name}: not found")
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        notes.append(f"{path.name}: not valid YAML ({error.__class__.__name__}), ignored")
        return {}
    return config if isinstance(config, dict) else {}


def _read_summary(path: Path, notes: list[str]) -> dict[str, Any]:
    if not path.exists():
        notes.append("summary.json: not found (the run crashed, was stopped, or is still running)")
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        notes.append("summary.json: not valid JSON (cut short?), ignored")
        return {}
    return decode_nonfinite(summary) if isinstance(summary, dict) else {}


def is_run_dir(path: str | Path) -> bool:
    """True when ``path`` holds a run (config.yaml or metrics.jsonl)."""
    return any((Path(path) / marker).is_file() for marker in RUN_MARKERS)


def load_run(run_dir: str | Path) -> Run:
    """Read a run folder. Raises FileNotFoundError when it holds neither config.yaml nor metrics.jsonl."""
    path = Path(run_dir)
    if not is_run_dir(path):
        raise FileNotFoundError(f"{path}: not a run folder (no {' or '.join(RUN_MARKERS)})")
    notes: list[str] = []
    config = _read_yaml(path / "config.yaml", notes)
    metrics = metrics_frame(read_jsonl(path / "metrics.jsonl", notes))
    events = events_frame(read_jsonl(path / "events.jsonl", notes))
    summary = _read_summary(path / "summary.json", notes)
    return Run(
        path=path,
        name=path.name,
        config=config,
        metrics=metrics,
        events=events,
        summary=summary,
        status=str(summary.get("status") or INCOMPLETE),
        notes=notes,
    )


def find_runs(root: str | Path) -> list[Path]:
    """Run folders at or under ``root``, sorted by path (checkpoint and figure folders are not searched)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    found = [root] if is_run_dir(root) else []
    for marker in RUN_MARKERS:
        for hit in root.rglob(marker):
            if not any(part in SKIPPED_DIRS for part in hit.relative_to(root).parts):
                found.append(hit.parent)
    return sorted(set(found))


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys: ``{"quant": {"weight": "E4M3"}}`` -> ``{"quant.weight": "E4M3"}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def lookup(config: dict[str, Any], dotted: str) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``; None when any part is missing."""
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def render_value(value: Any) -> str:
    """A config value as short text: dicts as ``k=v, ...``, lists joined by ``; ``."""
    if isinstance(value, dict):
        return ", ".join(f"{key}={render_value(item)}" for key, item in value.items())
    if isinstance(value, list | tuple):
        return "; ".join(render_value(item) for item in value)
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:g}"
    return str(value)
