"""Run an experiment grid: one run folder per cell, resumable, failures recorded, optionally parallel.

For each cell of the grid, in order:

* ``summary.json`` says ``completed`` or ``nan_stop``: finished (a NaN stop is a result), skipped;
* a checkpoint but no finished summary: interrupted (or failed), resumed from the checkpoint;
* nothing yet: trained from scratch;
* a run folder made by a different config (the grid changed): failed, naming the keys that differ
  (``logging.*`` keys excepted: they change no result).

A cell that raises is recorded as ``failed`` with its error and the others go on. SIGINT or SIGTERM
stops the matrix the way it stops a run: no new cell starts, running cells stop at a step boundary
with a checkpoint (the signal reaches spawned workers from the terminal, and a SIGTERM sent to the
runner alone is passed on to them), they are left ``pending`` and a rerun resumes them.
``matrix.json`` in the matrix folder is rewritten atomically (strict JSON) at every change::

    {"cells": [{"name": "E4M3-adamw-s0", "assignment": {"quant.weight": "E4M3", "seed": 0, ...},
                "baseline": null, "status": "completed", "error": null, "equivalent_to": null}, ...],
     "axes": {"quant.weight": ["E5M2", "E4M3"], ...}, "base": {...the resolved base config...},
     "engine": "local"}

``status`` is ``pending``, ``running``, ``completed`` (the run's own summary.json tells completed from
nan_stop) or ``failed``. ``jobs > 1`` runs cells in that many spawned processes, each with
``torch.set_num_threads(max(1, cores // jobs))`` and worker k on ``cuda:(k mod GPUs)``; ``run_cell``
must then be a module-level function. A worker whose runner dies stops its cell and exits.
``engine=RayEngine(...)`` (``ray_engine.py``) runs the cells as Ray tasks instead, with the same
planning, locks and records (``"engine": "ray"``; a cell Ray ran again after its worker died says
``"retried"``).

Several launches may share a grid (terminals, nodes, Slurm array tasks): a cell runs only under its
lock (``cell_lock.py``), taken just before it starts, and is planned again under the lock; a launch
skips the cells another one holds and at the end reports those still held (``MatrixResult.elsewhere``).
Each launch writes matrix.json entries for the cells it planned or ran and keeps the others' entries.
``shard=(K, N)`` and ``cells`` select a deterministic subset (``select_cells``).

Example::

    >>> result = run_matrix("experiments/quick.yaml", jobs=2)
    >>> result.completed, result.failed, result.skipped
    (13, 0, 0)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from altgrad.jsonio import write_json_atomic
from altgrad.training.checkpoint import latest_checkpoint
from altgrad.training.config import ConfigError, config_from_dict
from altgrad.training.interrupt import StopOnSignal

from .cell_lock import CellLock, describe_owner, held_by_other
from .grid import Cell, Grid, format_assignment, load_grid

FINISHED = ("completed", "nan_stop")
_running_cell = threading.Event()  # set while this process runs a cell (a pool worker's watcher reads it)
RunCell = Callable[[dict[str, Any], bool], dict[str, Any]]


@dataclass
class MatrixResult:
    """What one ``run_matrix`` call did: cells run to the end now, failed now, finished before, and
    the signal that stopped it (None when it ran to the end)."""

    matrix_dir: Path
    completed: int = 0
    failed: int = 0
    skipped: int = 0
    cells: list[dict[str, Any]] = field(default_factory=list)
    interrupted_by: str | None = None
    elsewhere: dict[str, str] = field(default_factory=dict)  # cell -> who holds it, or why it is left


def train_cell(config: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The default ``run_cell``: train one cell (or resume it from its checkpoint) with the trainer.

    ``plan_cell`` has already checked the folder: a fresh start only replaces a same-config run that
    left no checkpoint and no finished summary."""
    from altgrad.training.trainer import train

    return train(config_from_dict(config), resume=resume, overwrite=not resume)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    return {
        k: v for key, value in data.items() for k, v in _flatten(value, f"{prefix}.{key}".lstrip(".")).items()
    }


def plan_cell(cell: Cell) -> tuple[str, str | None]:
    """``("skip" | "resume" | "run" | "conflict", why)`` for a cell, from what its run folder holds."""
    run_dir = cell.run_dir
    saved = run_dir / "config.yaml"
    if saved.is_file():
        try:
            before = _flatten(config_from_dict(yaml.safe_load(saved.read_text())).to_dict())
        except (ConfigError, yaml.YAMLError) as error:
            return "conflict", f"{saved} is not a valid run config ({error}); delete {run_dir} to rerun it"
        now = _flatten(cell.config.to_dict())
        changed = sorted(key for key in before.keys() | now.keys()
                         if before.get(key) != now.get(key) and not key.startswith("logging."))  # fmt: skip
        if changed:
            return "conflict", (
                f"{run_dir} holds a run of a different config (differs in {', '.join(changed)}); "
                "delete the folder to rerun the cell, or give the matrix another name (the trainer's "
                "rule too: a run is never replaced without being asked)"
            )
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            if json.loads(summary.read_text()).get("status") in FINISHED:
                return "skip", None
        except json.JSONDecodeError:
            pass
    if latest_checkpoint(run_dir / "checkpoints") is not None:
        return "resume", None
    return "run", None


def _record(cell: Cell, status: str, error: str | None = None) -> dict[str, Any]:
    return dataclasses.replace(cell, status=status, error=error).record()


def write_matrix_json(grid: Grid, records: list[dict[str, Any]], engine: str = "local") -> Path:
    """Write ``<matrix_dir>/matrix.json`` atomically: a reader never sees a half-written file."""
    grid.matrix_dir.mkdir(parents=True, exist_ok=True)
    document = {"cells": records, "axes": grid.axes, "base": grid.base.to_dict(), "engine": engine}
    return write_json_atomic(grid.matrix_dir / "matrix.json", document)


def _merge_matrix_json(grid: Grid, records: list[dict[str, Any]], owned: set[int], engine: str) -> None:
    """Write matrix.json with this launch's records for the cells it ``owned`` (planned or locked) and,
    for the others, the records another launch (a shard, a concurrent launch) left in the file.

    The read-merge-write is serialized between launches by ``flock`` on ``matrix.json.lock`` where
    the file system has it (Lustre without ``-o flock`` has not: then two launches writing at the same
    instant can lose one update, which the next write of that launch repairs)."""
    grid.matrix_dir.mkdir(parents=True, exist_ok=True)
    with open(grid.matrix_dir / "matrix.json.lock", "a") as guard:
        with contextlib.suppress(OSError):
            fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            before = json.loads((grid.matrix_dir / "matrix.json").read_text()).get("cells", [])
            on_disk = {
                entry["name"]: entry for entry in before if isinstance(entry, dict) and "name" in entry
            }
        except (FileNotFoundError, json.JSONDecodeError, AttributeError):
            on_disk = {}
        merged = [
            record if i in owned or record["name"] not in on_disk else on_disk[record["name"]]
            for i, record in enumerate(records)
        ]
        write_matrix_json(grid, merged, engine)


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)``; K is 0-based (0 <= K < N): shard K runs cells K, K+N, K+2N, ... in grid order.

    For a Slurm array ``--array=0-(N-1)``: ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError(
            f"--shard: expected K/N with 0 <= K < N (K is 0-based, as SLURM_ARRAY_TASK_ID of "
            f"--array=0-(N-1)), got {text!r}"
        )
    return int(match[1]), int(match[2])


def select_cells(
    grid: Grid, shard: tuple[int, int] | None = None, names: list[str] | None = None
) -> list[int]:
    """The indices (grid order) of the cells named in ``names`` (all when empty) that fall in ``shard``."""
    known = {cell.name: i for i, cell in enumerate(grid.cells)}
    unknown = [name for name in names or [] if name not in known]
    if unknown:
        raise ValueError(
            f"--cell: no cell named {', '.join(map(repr, unknown))} in {grid.name}; "
            "list the cells with: altgrad matrix GRID --list"
        )
    indices = sorted({known[name] for name in names}) if names else list(range(len(grid.cells)))
    return [i for i in indices if shard is None or i % shard[1] == shard[0]]


def cell_status(cell: Cell) -> dict[str, Any]:
    """What the cell's folder says now: matrix.json's fields (status ``running`` while another launch
    holds its lock), the ``plan`` (skip, resume, run, conflict) and ``locked_by`` (the lock's owner)."""
    action, why = plan_cell(cell)
    owner = held_by_other(cell.run_dir)
    status = "running" if owner else {"skip": "completed", "conflict": "failed"}.get(action, "pending")
    return _record(cell, status, why) | {"plan": action, "locked_by": owner}


def describe_grid(grid: Grid, selected: list[int] | None = None) -> str:
    """The expanded cells, one a line: name, what would happen, assignment, equivalence; with
    ``selected`` (indices, see ``select_cells``) only those, and the header says of how many."""
    chosen = [grid.cells[i] for i in selected] if selected is not None else grid.cells
    plans = [plan_cell(cell) for cell in chosen]
    count = {
        action: sum(plan[0] == action for plan in plans) for action in ("skip", "resume", "run", "conflict")
    }
    width = max((len(cell.name) for cell in chosen), default=0)
    of_all = f" of {len(grid.cells)}" if len(chosen) != len(grid.cells) else ""
    lines = [
        f"matrix {grid.matrix_dir}: {len(chosen)}{of_all} cells ({count['skip']} finished, {count['resume']} "
        f"to resume, {count['run']} to run, {count['conflict']} in conflict)"
    ]
    for cell, (action, why) in zip(chosen, plans, strict=True):
        line = f"  {cell.name.ljust(width)}  {action:<8}  "
        line += f"baseline {cell.baseline}: " if cell.baseline else ""
        line += format_assignment(cell.assignment)
        line += f"  [same results as {cell.equivalent_to}]" if cell.equivalent_to else ""
        lines.append(line + (f"\n      {why}" if why else ""))
    return "\n".join(lines)


def _run_one(run_cell: RunCell, config: dict[str, Any], resume: bool) -> tuple[str, str | None, str | None]:
    """Run one cell: ``(status in matrix.json, error, signal)``; a cell stopped by a signal is pending."""
    _running_cell.set()
    try:
        summary = run_cell(config, resume)
    except Exception as error:
        return "failed", f"{type(error).__name__}: {error}", None
    finally:
        _running_cell.clear()
    status = summary.get("status") if isinstance(summary, dict) else None
    if status == "interrupted":
        return "pending", None, summary.get("signal")
    if status in FINISHED:
        return "completed", None, None
    return "failed", f"the run ended with status {status!r}", None


def worker_gpu(index: int, gpu_count: int) -> int | None:
    """The GPU of pool worker ``index``: ``index mod gpu_count`` (None without a GPU)."""
    return index % gpu_count if gpu_count > 0 else None


def place_worker(counter: Any) -> int | None:
    """In a pool worker: take the next worker index from the shared ``counter`` and make
    ``cuda:(index mod GPUs)`` the current device (``train.device`` auto or cuda trains there)."""
    import torch

    with counter.get_lock():
        index, counter.value = counter.value, counter.value + 1
    gpu = worker_gpu(index, torch.cuda.device_count())
    if gpu is not None:
        torch.cuda.set_device(gpu)
    return gpu


def _init_worker(threads: int, stopping: Any, counter: Any) -> None:
    import torch

    torch.set_num_threads(threads)
    place_worker(counter)
    for signum in (signal.SIGINT, signal.SIGTERM):  # an idle worker ignores them; a run handles its own
        signal.signal(signum, signal.SIG_IGN)
    threading.Thread(target=_stop_when_set, args=(stopping,), daemon=True).start()


def _stop_when_set(stopping: Any) -> None:
    """In a worker: once the runner stops (or dies: its cell locks are then stale, and another launch
    may take the cells over), SIGTERM this process every half second until it exits.

    A running cell stops at its next step boundary (repeated SIGTERMs change nothing), an idle worker
    ignores them. A signal sent to the runner alone does not reach its workers; this passes it on."""
    runner_pid = os.getppid()
    while not stopping.wait(1.0):
        if os.getppid() != runner_pid:  # the runner is gone: stop the cell, then this orphaned worker
            while _running_cell.is_set():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)
            os._exit(1)
    while True:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)


class LocalPool(ProcessPoolExecutor):
    """The default engine for ``jobs > 1``: ``jobs`` spawned processes, each with
    ``cores // jobs`` torch threads and worker k on ``cuda:(k mod GPUs)``; ``stop`` asks them to stop."""

    name = "local"

    def __init__(self, jobs: int) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.slots, self._stopping = jobs, spawn.Event()
        initargs = (max(1, _cores() // jobs), self._stopping, spawn.Value("i", 0))
        super().__init__(jobs, mp_context=spawn, initializer=_init_worker, initargs=initargs)

    def stop(self) -> None:
        self._stopping.set()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_matrix(
    grid_path: str | Path,
    jobs: int = 1,
    dry_run: bool = False,
    run_cell: RunCell | None = None,
    shard: tuple[int, int] | None = None,
    cells: list[str] | None = None,
    engine: Any | None = None,
) -> MatrixResult:
    """Expand the grid and run every unfinished cell of the selection (``shard``, ``cells``: see
    ``select_cells``) that no other launch holds; ``dry_run`` prints the cells and runs nothing.

    ``engine`` runs the cells instead of the local pool: a context manager giving an object with
    ``name``, ``slots`` (cells at once), ``submit(_run_one, run_cell, config, resume) -> Future`` and
    ``stop()`` (see ``LocalPool``, ``ray_engine.RayEngine``)."""
    if jobs < 1:
        raise ValueError(f"jobs: expected a positive number of parallel runs, got {jobs}")
    engine_name = engine.name if engine is not None else LocalPool.name
    grid = load_grid(grid_path)
    selected = select_cells(grid, shard, cells)
    run_cell = run_cell or train_cell
    result = MatrixResult(grid.matrix_dir)
    if dry_run:  # what this launch would do: its shard and --cell selection only
        print(describe_grid(grid, selected))
        result.skipped = sum(plan_cell(grid.cells[i])[0] == "skip" for i in selected)
        return result

    records, todo, owned, selection = [], [], set(), set(selected)
    for i, cell in enumerate(grid.cells):
        action, why = plan_cell(cell)
        status = {"skip": "completed", "conflict": "failed"}.get(action, "pending")
        records.append(_record(cell, status, why))
        if i not in selection:
            continue
        if action in ("skip", "conflict"):  # facts of the folder: this launch writes them
            owned.add(i)
        result.skipped += action == "skip"
        result.failed += action == "conflict"
        if action in ("resume", "run"):
            todo.append(i)
    result.cells = records
    _merge_matrix_json(grid, records, owned, engine_name)
    tty = sys.stderr.isatty()
    progress = tqdm(total=len(selected), initial=result.skipped + result.failed, desc=grid.name, unit="cell",
                    disable=not tty)  # fmt: skip
    locks: dict[int, CellLock] = {}
    elsewhere: list[int] = []  # cells another launch held when this one came to them

    def claim(i: int) -> bool | None:
        """Lock cell i and plan it again (another launch may have finished it): resume?, or None."""
        lock = CellLock.acquire(grid.cells[i].run_dir)
        if lock is None:
            elsewhere.append(i)
            return None
        action, why = plan_cell(grid.cells[i])
        if action in ("skip", "conflict"):
            lock.release()
            owned.add(i)
            records[i] = _record(grid.cells[i], "completed" if action == "skip" else "failed", why)
            result.skipped += action == "skip"
            result.failed += action == "conflict"
            progress.update()
            return None
        locks[i] = lock
        owned.add(i)
        records[i] = _record(grid.cells[i], "running")
        _merge_matrix_json(grid, records, owned, engine_name)
        return action == "resume"

    def finish(i: int, outcome: tuple[str, str | None, str | None]) -> None:
        status, error, stopped_by, *note = outcome  # an engine may add a note: {"retried": why}
        records[i] = _record(grid.cells[i], status, error) | (note[0] if note else {})
        _merge_matrix_json(grid, records, owned, engine_name)
        locks.pop(i).release()
        result.completed += status == "completed"
        result.failed += status == "failed"
        # the runner's own signal first: a Ray task is stopped by a SIGINT whatever the runner got
        result.interrupted_by = result.interrupted_by or stop.name or stopped_by
        if error:
            progress.write(f"cell {grid.cells[i].name} failed: {error}")
        if note:
            progress.write(f"cell {grid.cells[i].name}: {', '.join(note[0].values())}")
        if status != "pending":
            progress.update()
        progress.set_postfix(failed=result.failed)
        if not tty:  # a log file gets one plain line per cell instead of a bar
            done = result.completed + result.failed + result.skipped
            print(f"{grid.name}: cell {grid.cells[i].name} {status} ({done}/{len(selected)} cells)",
                  file=sys.stderr, flush=True)  # fmt: skip

    # SIGINT/SIGTERM between cells: start no new cell (a running cell stops itself at a step boundary)
    stop = StopOnSignal().install()
    try:
        if jobs == 1 and engine is None:
            for i in todo:
                if stop.requested or result.interrupted_by:
                    break
                resume = claim(i)
                if resume is not None:
                    finish(i, _run_one(run_cell, grid.cells[i].config.to_dict(), resume))
        else:
            with engine or LocalPool(jobs) as pool:
                queue, running = list(reversed(todo)), {}
                while queue or running:
                    while queue and len(running) < pool.slots and not stop.requested:
                        i = queue.pop()
                        resume = claim(i)
                        if resume is not None:
                            config = grid.cells[i].config.to_dict()
                            running[pool.submit(_run_one, run_cell, config, resume)] = i
                    if not running:
                        break
                    done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                    if stop.requested:
                        pool.stop()
                    for future in done:
                        i = running.pop(future)
                        try:
                            outcome = future.result()
                        except Exception as crash:  # the worker process died (killed, out of memory)
                            error = f"worker process failed: {type(crash).__name__}: {crash}"
                            # a Ctrl-C can reach a worker still starting up: left to the rerun
                            outcome = ("pending", None, None) if stop.requested else ("failed", error, None)
                        finish(i, outcome)
    finally:
        stop.uninstall()
        result.interrupted_by = result.interrupted_by or stop.name
        progress.close()
        for i in list(locks):  # interrupted: left to resume
            records[i] = _record(grid.cells[i], "pending")
            locks.pop(i).release()
        _merge_matrix_json(grid, records, owned, engine_name)
    result.elsewhere = _left_to_others(grid, elsewhere, records, owned, result, engine_name)
    return result


def _left_to_others(
    grid: Grid,
    indices: list[int],
    records: list[dict[str, Any]],
    owned: set[int],
    result: MatrixResult,
    engine: str,
) -> dict[str, str]:
    """At the end: the cells another launch held, looked at again. Finished ones count as skipped;
    the others map to what holds them (still running) or to why they are left (for a rerun)."""
    left = {}
    for i in indices:
        cell = grid.cells[i]
        owner = held_by_other(cell.run_dir)
        if owner is not None:
            left[cell.name] = "running in another launch: " + describe_owner(cell.run_dir, owner)
        elif plan_cell(cell)[0] == "skip":
            result.skipped += 1
            owned.add(i)
            records[i] = _record(cell, "completed")
        else:
            left[cell.name] = "another launch left it unfinished; rerun the matrix to resume it"
    if indices:
        _merge_matrix_json(grid, records, owned, engine)
    return left
