"""Launches that share a grid: cell locks, --shard, --cell, --list --json, and --jobs GPU placement."""

import argparse
import contextlib
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from altgrad.experiments import runner
from altgrad.experiments.cell_lock import LOCK_NAME, CellLock, held_by_other
from altgrad.experiments.cli import register
from altgrad.experiments.grid import load_grid
from altgrad.experiments.runner import parse_shard, place_worker, run_matrix, select_cells, worker_gpu

SRC = Path(runner.__file__).parents[2]
NAMES = ["E4M3-adamw", "E4M3-grid", "E1M6-adamw", "E1M6-grid", "E0M7-adamw", "E0M7-grid", "fp32"]



def write_grid(tmp_path, **spec):
    spec = {
        "name": "m", "out_dir": str(tmp_path / "runs"),
        "base": {"model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16},
                 "train": {"max_steps": 5}},
        "axes": {"quant.weight,quant.activation": ["E4M3", "E1M6", "E0M7"],
                 "optimizer.name": ["adamw", "grid"]},
        "baselines": {"fp32": {"quant.enabled": False}}, **spec,
    }  # fmt: skip
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli(argv):
    parser = argparse.ArgumentParser(prog="altgrad")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["matrix", *argv])
    return args.handler(args)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(run_dir: Path, pid: int, host: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    owner = {"host": host or socket.gethostname(), "pid": pid, "started": time.time(), "token": "x"}
    (run_dir / LOCK_NAME).write_text(json.dumps(owner))


# ---- the lock ---------------------------------------------------------------------------------------


def test_a_lock_is_exclusive_while_its_owner_lives_and_gone_once_released(tmp_path):
    lock = CellLock.acquire(tmp_path / "cell")
    owner = json.loads((tmp_path / "cell" / LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    lock.release()
    assert not (tmp_path / "cell" / LOCK_NAME).exists()
    lock.release()  # idempotent

    write_lock(tmp_path / "cell", os.getppid())  # a live process on this host holds it
    assert CellLock.acquire(tmp_path / "cell") is None
    assert held_by_other(tmp_path / "cell")["pid"] == os.getppid()


def test_a_stale_lock_of_a_dead_process_is_taken_over_but_another_hosts_lock_is_not(tmp_path):
    write_lock(tmp_path / "dead", dead_pid())
    assert held_by_other(tmp_path / "dead") is None
    lock = CellLock.acquire(tmp_path / "dead")
    assert lock is not None and json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert sorted(os.listdir(tmp_path / "dead")) == [LOCK_NAME]  # the stale file is gone, not renamed aside

    write_lock(tmp_path / "far", dead_pid(), host="another-node")  # cannot be checked from here
    assert CellLock.acquire(tmp_path / "far") is None


def test_an_unreadable_lock_is_held_for_a_minute_then_stale(tmp_path):
    (tmp_path / "cell").mkdir()
    (tmp_path / "cell" / LOCK_NAME).write_text("")  # created, not yet written (or its owner died then)
    assert CellLock.acquire(tmp_path / "cell") is None
    old = time.time() - 61
    os.utime(tmp_path / "cell" / LOCK_NAME, (old, old))
    assert CellLock.acquire(tmp_path / "cell") is not None


def test_release_leaves_a_lock_that_is_no_longer_this_ones(tmp_path):
    lock = CellLock.acquire(tmp_path / "cell")
    write_lock(tmp_path / "cell", os.getppid())  # taken over (as if this lock had been judged stale)
    lock.release()
    assert held_by_other(tmp_path / "cell")["pid"] == os.getppid()


# ---- a launch meeting another launch's cells ------------------------------------------------------


def test_a_cell_locked_by_another_launch_is_not_run_and_is_reported(tmp_path, fakes, capsys, monkeypatch):
    monkeypatch.setattr(runner, "train_cell", fakes.fake_cell)
    grid = write_grid(tmp_path)
    matrix_dir = tmp_path / "runs" / "m"
    write_lock(matrix_dir / "E1M6-grid", os.getppid())
    result = run_matrix(grid, run_cell=fakes.fake_cell)
    assert (result.completed, result.failed, result.skipped) == (6, 0, 0)
    assert "E1M6-grid" not in [call["name"] for call in fakes.calls(matrix_dir)]
    assert list(result.elsewhere) == ["E1M6-grid"]
    assert result.elsewhere["E1M6-grid"].startswith(f"running in another launch: pid {os.getppid()} on ")
    assert (matrix_dir / "E1M6-grid" / LOCK_NAME).exists()  # not touched

    (matrix_dir / "E1M6-grid" / LOCK_NAME).unlink()  # that launch ends: the rerun runs the cell
    assert cli([str(grid)]) == 0
    assert "1 completed, 0 failed, 6 already finished" in capsys.readouterr().out
    assert [call["name"] for call in fakes.calls(matrix_dir)][-1] == "E1M6-grid"


def test_a_cell_another_launch_finished_while_this_one_waited_is_skipped(tmp_path, fakes):
    grid = write_grid(tmp_path)
    matrix_dir = tmp_path / "runs" / "m"
    fakes.fake_cell(load_grid(grid).cells[2].config.to_dict(), False)  # E1M6-adamw finished elsewhere
    (matrix_dir / "calls.jsonl").unlink()
    result = run_matrix(grid, run_cell=fakes.fake_cell)
    assert (result.completed, result.skipped) == (6, 1)
    assert "E1M6-adamw" not in [call["name"] for call in fakes.calls(matrix_dir)]


def test_two_concurrent_launches_run_every_cell_exactly_once(tmp_path):
    """Two real launches (tiny model, 4 cells) on one grid at once: every cell has one start event."""
    base = {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8},
        "train": {"max_steps": 4, "batch_size": 2, "warmup_steps": 1, "eval_interval": 4, "eval_batches": 1},
        "checkpoint": {"interval": 100},
        "logging": {"progress": False},
    }
    grid = write_grid(
        tmp_path, base=base, axes={"quant.weight": ["E4M3", "E5M2", "E3M4", "E2M5"]}, baselines={}
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "altgrad", "matrix", str(grid)]
    launches = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]  # fmt: skip
    outputs = [launch.communicate(timeout=300) for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], outputs
    ran = [line.split()[2] for _, err in outputs for line in err.splitlines() if " completed (" in line]
    assert sorted(ran) == sorted(["E4M3", "E5M2", "E3M4", "E2M5"])  # each launch's own log: once in all
    matrix_dir = tmp_path / "runs" / "m"
    cells = ["E4M3", "E5M2", "E3M4", "E2M5"]
    starts = Counter()
    for cell in cells:
        for line in (matrix_dir / cell / "events.jsonl").read_text().splitlines():
            event = json.loads(line)
            starts[cell] += event["kind"] in ("start", "resume")
        assert json.loads((matrix_dir / cell / "summary.json").read_text())["steps"] == 4
    assert starts == dict.fromkeys(cells, 1)
    assert not list(matrix_dir.glob(f"*/{LOCK_NAME}"))
    statuses = {c["name"]: c["status"] for c in json.loads((matrix_dir / "matrix.json").read_text())["cells"]}
    assert statuses == dict.fromkeys(cells, "completed")


# ---- subsets ----------------------------------------------------------------------------------------


def test_shards_partition_the_cells(tmp_path):
    grid = load_grid(write_grid(tmp_path))
    for n in range(1, 9):
        shards = [select_cells(grid, (k, n)) for k in range(n)]
        assert sorted(i for shard in shards for i in shard) == list(range(7))  # union = all, disjoint
        reloaded = load_grid(write_grid(tmp_path))  # the same cells from a fresh load: deterministic
        assert shards == [select_cells(reloaded, (k, n)) for k in range(n)]
    assert [grid.cells[i].name for i in select_cells(grid, (1, 3))] == ["E4M3-grid", "E0M7-adamw"]
    assert select_cells(grid, (7, 8)) == []


@pytest.mark.parametrize("text", ["3/3", "1", "-1/2", "a/b", "0/0", "1/4/2"])
def test_a_bad_shard_is_a_one_line_error(text):
    with pytest.raises(ValueError, match=r"--shard: expected K/N with 0 <= K < N \(K is 0-based"):
        parse_shard(text)


def test_parse_shard_takes_slurm_style_numbers():
    assert parse_shard("0/4") == (0, 4) and parse_shard("3/4") == (3, 4)


def test_shard_and_cell_run_just_their_cells(tmp_path, fakes):
    grid = write_grid(tmp_path)
    matrix_dir = tmp_path / "runs" / "m"
    result = run_matrix(grid, run_cell=fakes.fake_cell, shard=(0, 2))
    assert [call["name"] for call in fakes.calls(matrix_dir)] == NAMES[0::2]
    assert result.completed == 4
    statuses = [cell["status"] for cell in json.loads((matrix_dir / "matrix.json").read_text())["cells"]]
    assert statuses == ["completed", "pending"] * 3 + ["completed"]  # every cell listed, for the report

    run_matrix(grid, run_cell=fakes.fake_cell, cells=["fp32", "E1M6-grid", "E4M3-grid"])  # fp32 done
    assert [call["name"] for call in fakes.calls(matrix_dir)][4:] == ["E4M3-grid", "E1M6-grid"]
    with pytest.raises(ValueError, match="--cell: no cell named 'nope' in m"):
        run_matrix(grid, run_cell=fakes.fake_cell, cells=["nope"])


def test_two_shards_write_one_matrix_json(tmp_path, fakes):
    grid = write_grid(tmp_path)
    run_matrix(grid, run_cell=fakes.fake_cell, shard=(1, 2))
    run_matrix(grid, run_cell=fakes.fake_cell, shard=(0, 2))
    cells = json.loads((tmp_path / "runs" / "m" / "matrix.json").read_text())["cells"]
    assert [cell["name"] for cell in cells] == NAMES and {cell["status"] for cell in cells} == {"completed"}


def test_list_json_prints_every_cell_with_its_status(tmp_path, fakes, capsys):
    grid = write_grid(tmp_path)
    run_matrix(grid, run_cell=fakes.fake_cell, cells=["E4M3-adamw"])
    write_lock(tmp_path / "runs" / "m" / "E4M3-grid", os.getppid())
    capsys.readouterr()
    assert cli([str(grid), "--list", "--json"]) == 0
    cells = json.loads(capsys.readouterr().out)
    assert [cell["name"] for cell in cells] == NAMES
    assert [cell["status"] for cell in cells] == ["completed", "running"] + ["pending"] * 5
    assert cells[1]["locked_by"]["pid"] == os.getppid() and cells[0]["locked_by"] is None
    assert cells[0]["assignment"] == {
        "quant.weight": "E4M3",
        "quant.activation": "E4M3",
        "optimizer.name": "adamw",
    }
    assert cells[-1]["baseline"] == "fp32" and cells[4]["equivalent_to"] == "E1M6-adamw"
    assert cells[0]["plan"] == "skip" and cells[2]["plan"] == "run"

    assert cli([str(grid), "--list", "--json", "--shard", "1/3"]) == 0
    assert [cell["name"] for cell in json.loads(capsys.readouterr().out)] == ["E4M3-grid", "E0M7-adamw"]
    with pytest.raises(ValueError, match="--json goes with --list"):
        cli([str(grid), "--json"])


def test_the_altgrad_command_rejects_a_bad_shard_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    command = [sys.executable, "-m", "altgrad", "matrix", str(write_grid(tmp_path)), "--shard", "4/4"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("altgrad: error: --shard: expected K/N with 0 <= K < N")


# ---- --jobs placement -------------------------------------------------------------------------------


def test_worker_k_trains_on_gpu_k_mod_the_gpu_count():
    assert [worker_gpu(k, 3) for k in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert [worker_gpu(k, 1) for k in range(3)] == [0, 0, 0]
    assert worker_gpu(0, 0) is None


def test_each_pool_worker_takes_the_next_index_and_sets_its_gpu(monkeypatch):
    import torch

    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    assert [place_worker(counter) for _ in range(5)] == [0, 1, 0, 1, 0] == chosen

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert place_worker(counter) is None and chosen == [0, 1, 0, 1, 0]


def test_workers_of_a_killed_runner_stop_and_the_next_launch_takes_their_cells_over(tmp_path, fakes):
    """kill -9 of a --jobs 2 runner: its workers stop at a step boundary with a checkpoint (their
    runner's locks are now stale), and a new launch takes the cells over and resumes them."""
    base = {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8},
        "train": {
            "max_steps": 300,
            "batch_size": 2,
            "warmup_steps": 1,
            "eval_interval": 300,
            "eval_batches": 1,
        },
        "checkpoint": {"interval": 1000},
        "logging": {"progress": False},
    }
    grid = write_grid(tmp_path, base=base, axes={"quant.weight": ["E4M3", "E5M2"]}, baselines={})
    env = {**os.environ, "PYTHONPATH": str(SRC), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "altgrad", "matrix", str(grid), "--jobs", "2"]
    runner_process = subprocess.Popen(command, env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    group = runner_process.pid  # the runner and its workers
    matrix_dir = tmp_path / "runs" / "m"
    try:
        deadline = time.monotonic() + 180
        while sum(path.is_file() for path in matrix_dir.glob("*/metrics.jsonl")) < 2:
            assert runner_process.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        runner_process.kill()
        runner_process.wait()
        while True:  # the orphaned workers exit on their own
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline + 60, "the workers of a killed runner kept running"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    for cell in ("E4M3", "E5M2"):
        summary = json.loads((matrix_dir / cell / "summary.json").read_text())
        assert (summary["status"], summary["signal"]) == ("interrupted", "SIGTERM") and summary["steps"] < 300
        assert held_by_other(matrix_dir / cell) is None  # stale: its owner, the runner, is dead

    result = run_matrix(grid, run_cell=fakes.fake_cell)  # no need to train the rest: who runs what
    assert (result.completed, result.failed, result.elsewhere) == (2, 0, {})
    assert sorted((call["name"], call["resume"]) for call in fakes.calls(matrix_dir)) == [
        ("E4M3", True), ("E5M2", True)
    ]  # fmt: skip
    assert not list(matrix_dir.glob(f"*/{LOCK_NAME}"))
