"""``altgrad matrix GRID --engine ray`` on one local Ray instance (2 CPUs) shared by the module."""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from altgrad.analysis.report import write_report
from altgrad.experiments import ray_engine
from altgrad.experiments.cli import register
from altgrad.experiments.runner import run_matrix

HERE = Path(__file__).parent
SRC = Path(ray_engine.__file__).parents[2]


def write_grid(tmp_path, base, axes):
    spec = {"name": "m", "out_dir": str(tmp_path / "runs"), "base": base, "axes": axes}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def read_matrix(tmp_path):
    return json.loads((tmp_path / "runs" / "m" / "matrix.json").read_text())


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(ImportError, match=r"^--engine ray needs Ray: pip install 'altgrad\[ray\]'$"):
        ray_engine.RayEngine()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance whose workers import altgrad and the fake cells (they inherit PYTHONPATH)."""
    ray = pytest.importorskip("ray")
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), str(HERE), *([before] if before else [])])
    os.environ.setdefault("WANDB_MODE", "disabled")
    temp_dir = tempfile.mkdtemp(prefix="altgrad-ray-test-")
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def fakes(local_ray, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    import ray_fakes

    return ray_fakes


def test_a_tiny_grid_runs_as_ray_tasks_and_a_rerun_skips_every_cell(tmp_path, local_ray):
    base = {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16},
        "train": {"max_steps": 10, "batch_size": 4, "warmup_steps": 2, "eval_interval": 5, "eval_batches": 2},
        "checkpoint": {"interval": 5, "keep": 1},
        "logging": {"progress": False},
    }
    axes = {"quant.weight,quant.activation": ["E4M3", "E5M2"], "optimizer.name": ["adamw", "grid"]}
    grid = write_grid(tmp_path, base, axes)
    result = run_matrix(grid, engine=ray_engine.RayEngine(cpus_per_cell=1))
    matrix = read_matrix(tmp_path)
    assert (result.completed, result.failed, result.skipped) == (4, 0, 0), matrix
    assert matrix["engine"] == "ray" and [cell["status"] for cell in matrix["cells"]] == ["completed"] * 4
    for cell in matrix["cells"]:
        run_dir = tmp_path / "runs" / "m" / cell["name"]
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 10
        assert not (run_dir / ray_engine.ATTEMPT_MARKER).exists() and not (run_dir / "cell.lock").exists()
    assert write_report(tmp_path / "runs" / "m").is_file()

    result = run_matrix(grid, engine=ray_engine.RayEngine(cpus_per_cell=1))
    assert (result.completed, result.failed, result.skipped) == (0, 0, 4)
    assert local_ray.is_initialized()  # an instance the engine did not start is left running


def fake_grid(tmp_path, weights):
    base = {"model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16}, "train": {"max_steps": 5}}
    return write_grid(tmp_path, base, {"quant.weight": weights})


def test_a_task_sees_no_gpu_without_gpus_per_cell_and_its_cpus_as_threads(tmp_path, fakes):
    run_matrix(fake_grid(tmp_path, ["E4M3"]), run_cell=fakes.record_devices, engine=ray_engine.RayEngine())
    seen = json.loads((tmp_path / "runs" / "m" / "E4M3.devices.json").read_text())
    assert seen == {"CUDA_VISIBLE_DEVICES": "", "threads": 1}


def test_a_cell_whose_worker_dies_is_retried_once_and_recorded(tmp_path, fakes):
    result = run_matrix(
        fake_grid(tmp_path, ["E4M3"]), run_cell=fakes.crash_once, engine=ray_engine.RayEngine()
    )
    [cell] = read_matrix(tmp_path)["cells"]
    assert (result.completed, result.failed) == (1, 0), cell
    assert cell["status"] == "completed" and cell["retried"] == ray_engine.RETRIED
    assert (
        json.loads((tmp_path / "runs" / "m" / "E4M3" / "summary.json").read_text())["status"] == "completed"
    )


def test_a_cell_whose_worker_dies_twice_fails_and_a_python_error_is_not_retried(tmp_path, fakes):
    result = run_matrix(
        fake_grid(tmp_path, ["E4M3"]), run_cell=fakes.crash_always, engine=ray_engine.RayEngine()
    )
    [cell] = read_matrix(tmp_path)["cells"]
    assert (result.completed, result.failed) == (0, 1)
    assert cell["status"] == "failed" and "WorkerCrashedError" in cell["error"]

    (tmp_path / "b" / "runs" / "m").mkdir(parents=True)
    grid = fake_grid(tmp_path / "b", ["E4M3", "E5M2"])
    (tmp_path / "b" / "runs" / "m" / "plan.json").write_text(json.dumps({"E5M2": "raise"}))
    result = run_matrix(grid, run_cell=fakes.fake_cell, engine=ray_engine.RayEngine())
    cells = {cell["name"]: cell for cell in read_matrix(tmp_path / "b")["cells"]}
    assert (result.completed, result.failed) == (1, 1)
    assert cells["E5M2"]["error"] == "RuntimeError: synthetic failure in E5M2"
    import matrix_fakes

    assert [call["name"] for call in matrix_fakes.calls(tmp_path / "b" / "runs" / "m")].count("E5M2") == 1


def test_sigterm_cancels_the_ray_tasks_and_leaves_the_cells_to_resume(tmp_path, fakes):
    matrix_dir = tmp_path / "runs" / "m"
    grid = fake_grid(tmp_path, ["E4M3", "E5M2", "E3M4"])

    def sigterm_once_a_cell_runs():
        deadline = time.monotonic() + 60
        while not list(matrix_dir.glob("*.started")) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=sigterm_once_a_cell_runs, daemon=True).start()
    result = run_matrix(grid, run_cell=fakes.wait_for_stop, engine=ray_engine.RayEngine())
    assert result.interrupted_by == "SIGTERM" and (result.completed, result.failed) == (0, 0)
    assert [cell["status"] for cell in read_matrix(tmp_path)["cells"]] == ["pending"] * 3
    assert not list(matrix_dir.glob("*/cell.lock"))

    result = run_matrix(grid, run_cell=fakes.fake_cell, engine=ray_engine.RayEngine())
    assert (result.completed, result.failed, result.interrupted_by) == (3, 0, None)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--cpus-per-cell", "2"], "--cpus-per-cell go with --engine ray"),
        (["--engine", "ray", "--jobs", "2"], "--jobs is the local engine's"),
        (["--engine", "ray", "--cpus-per-cell", "0"], "--cpus-per-cell: expected a positive number of CPUs"),
    ],
)
def test_engine_options_are_checked(tmp_path, options, message):
    pytest.importorskip("ray")
    parser = argparse.ArgumentParser(prog="altgrad")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["matrix", str(fake_grid(tmp_path, ["E4M3"])), *options])
    with pytest.raises(ValueError, match=re.escape(message)):
        args.handler(args)


@pytest.mark.slow
def test_the_cli_starts_a_local_ray_instance_for_the_run_and_shuts_it_down(tmp_path):
    base = {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16},
        "train": {"max_steps": 3, "batch_size": 4, "eval_interval": 3, "eval_batches": 1},
        "logging": {"progress": False},
    }
    grid = write_grid(tmp_path, base, {"quant.weight": ["E4M3", "E5M2"]})
    env = {**os.environ, "PYTHONPATH": str(SRC), "WANDB_MODE": "disabled", "TMPDIR": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    temp_dirs = lambda: {path for path in Path("/tmp").glob("altgrad-ray-*") if "-test-" not in path.name}
    before = temp_dirs()
    done = subprocess.run(
        [sys.executable, "-m", "altgrad", "matrix", str(grid), "--engine", "ray"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "(2 completed, 0 failed, 0 already finished" in done.stdout
    assert read_matrix(tmp_path)["engine"] == "ray"
    assert temp_dirs() == before  # the instance's temporary folder (in /tmp, not a long TMPDIR) is removed
