"""Cells for the Ray engine tests: module-level, so Ray workers import them by name.

``record_devices`` writes what its task sees (``CUDA_VISIBLE_DEVICES``, torch threads) to
``<matrix_dir>/<cell>.devices.json``. ``crash_once`` kills its worker process (``os._exit``, as an
OOM kill or a lost node would) the first time a cell runs, noted by ``<matrix_dir>/<cell>.crashed``;
``crash_always`` every time. ``wait_for_stop`` waits (up to 60 s) for the SIGINT that ``ray.cancel``
sends, the way the trainer stops at a step boundary.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from matrix_fakes import fake_cell

from altgrad.training.config import config_from_dict
from altgrad.training.interrupt import StopOnSignal


def crash_once(config: dict[str, Any], resume: bool) -> dict[str, Any]:
    run_dir = config_from_dict(config).run_dir
    marker = run_dir.parent / f"{run_dir.name}.crashed"
    if not marker.exists():
        marker.touch()
        os._exit(1)
    return fake_cell(config, resume)


def crash_always(config: dict[str, Any], resume: bool) -> dict[str, Any]:
    os._exit(1)


def wait_for_stop(config: dict[str, Any], resume: bool) -> dict[str, Any]:
    run_dir = config_from_dict(config).run_dir
    stop = StopOnSignal().install()
    (run_dir.parent / f"{run_dir.name}.started").touch()
    deadline = time.monotonic() + 60
    while not stop.requested and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.uninstall()
    if not stop.requested:
        return fake_cell(config, resume)
    return {"name": run_dir.name, "status": "interrupted", "signal": stop.name}


def record_devices(config: dict[str, Any], resume: bool) -> dict[str, Any]:
    run_dir = config_from_dict(config).run_dir
    seen = {
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "threads": torch.get_num_threads(),
    }
    (run_dir.parent / f"{run_dir.name}.devices.json").write_text(json.dumps(seen))
    return fake_cell(config, resume)
