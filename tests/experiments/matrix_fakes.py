"""A stand-in for the trainer in runner tests: module-level, so spawned worker processes can import it.

``fake_cell`` writes what a real run leaves behind (config.yaml, summary.json), appends each call to
``<matrix_dir>/calls.jsonl``, and does what ``<matrix_dir>/plan.json`` says for its cell: ``"raise"``,
``"failed"`` (returns a failed summary), ``"nan_stop"``, ``"interrupted"`` (a run stopped by SIGTERM)
or ``"interrupt"`` (KeyboardInterrupt).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from altgrad.training.config import config_from_dict, save_config


def fake_cell(config: dict[str, Any], resume: bool) -> dict[str, Any]:
    run_config = config_from_dict(config)
    run_dir, matrix_dir = run_config.run_dir, run_config.run_dir.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run_config, run_dir / "config.yaml")
    call = {"name": run_config.name, "resume": resume, "pid": os.getpid(), "threads": torch.get_num_threads()}
    with open(matrix_dir / "calls.jsonl", "a") as file:
        file.write(json.dumps(call) + "\n")
    plan_path = matrix_dir / "plan.json"
    action = json.loads(plan_path.read_text()).get(run_config.name) if plan_path.is_file() else None
    if action == "raise":
        raise RuntimeError(f"synthetic failure in {run_config.name}")
    if action == "interrupt":
        raise KeyboardInterrupt
    summary = {"name": run_config.name, "status": action or "completed", "steps": run_config.train.max_steps}
    if action == "interrupted":
        summary["signal"] = "SIGTERM"
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return summary


def calls(matrix_dir: Path) -> list[dict[str, Any]]:
    path = matrix_dir / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
