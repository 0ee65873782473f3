import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from altgrad import jsonio
from altgrad.experiments import runner
from altgrad.experiments.cli import register
from altgrad.experiments.runner import run_matrix, write_matrix_json

TINY = {"model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16}, "train": {"max_steps": 5}}



def write_grid(tmp_path, **spec):
    spec = {
        "name": "m", "out_dir": str(tmp_path / "runs"), "base": TINY,
        "axes": {"quant.weight,quant.activation": ["E4M3", "E1M6", "E0M7"],
                 "optimizer.name": ["adamw", "grid"]},
        "baselines": {"fp32": {"quant.enabled": False}}, **spec,
    }  # fmt: skip
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def read_matrix(tmp_path):
    return json.loads((tmp_path / "runs" / "m" / "matrix.json").read_text())


def test_dry_run_prints_the_cells_and_runs_nothing(tmp_path, fakes, capsys):
    result = run_matrix(write_grid(tmp_path), dry_run=True, run_cell=fakes.fake_cell)
    out = capsys.readouterr().out
    assert "7 cells (0 finished, 0 to resume, 7 to run, 0 in conflict)" in out
    assert re.search(r"E0M7-grid +run +quant.weight=E0M7 .*\[same results as E1M6-grid\]", out)
    assert "baseline fp32: quant.enabled=false" in out
    assert not (tmp_path / "runs").exists() and result.completed == 0


def test_dry_run_lists_only_the_shard_and_cells_this_launch_would_run(tmp_path, fakes, capsys):
    grid = write_grid(tmp_path)
    run_matrix(grid, dry_run=True, run_cell=fakes.fake_cell, shard=(1, 3))  # cells 1 and 4 of 0..6
    out = capsys.readouterr().out
    assert "2 of 7 cells (0 finished, 0 to resume, 2 to run, 0 in conflict)" in out
    listed = re.findall(r"^  (\S+) ", out, flags=re.MULTILINE)
    assert listed == ["E4M3-grid", "E0M7-adamw"]
    run_matrix(grid, dry_run=True, run_cell=fakes.fake_cell, cells=["E1M6-adamw"])
    out = capsys.readouterr().out
    assert "1 of 7 cells" in out and re.findall(r"^  (\S+) ", out, flags=re.MULTILINE) == ["E1M6-adamw"]
    assert not (tmp_path / "runs").exists()


def test_runs_every_cell_and_writes_matrix_json(tmp_path, fakes):
    result = run_matrix(write_grid(tmp_path), run_cell=fakes.fake_cell)
    assert (result.completed, result.failed, result.skipped) == (7, 0, 0)
    matrix = read_matrix(tmp_path)
    assert set(matrix) == {"cells", "axes", "base", "engine"} and matrix["engine"] == "local"
    assert matrix["axes"]["quant.weight"] == ["E4M3", "E1M6", "E0M7"]
    assert matrix["base"]["model"]["n_embd"] == 32
    first, e0m7, baseline = matrix["cells"][0], matrix["cells"][4], matrix["cells"][-1]
    assert first == {
        "name": "E4M3-adamw",
        "assignment": {"quant.weight": "E4M3", "quant.activation": "E4M3", "optimizer.name": "adamw"},
        "baseline": None, "status": "completed", "error": None, "equivalent_to": None,
    }  # fmt: skip
    assert e0m7["name"] == "E0M7-adamw" and e0m7["equivalent_to"] == "E1M6-adamw"
    assert baseline["name"] == "fp32" and baseline["baseline"] == "fp32"
    assert [call["resume"] for call in fakes.calls(tmp_path / "runs" / "m")] == [False] * 7
    assert sorted(os.listdir(tmp_path / "runs" / "m"))[:2] == ["E0M7-adamw", "E0M7-grid"]
    assert not list((tmp_path / "runs" / "m").glob("*/cell.lock"))  # every cell lock released


def test_finished_cells_are_skipped_and_interrupted_ones_resumed(tmp_path, fakes):
    grid = write_grid(tmp_path)
    run_matrix(grid, run_cell=fakes.fake_cell)
    matrix_dir = tmp_path / "runs" / "m"
    (matrix_dir / "calls.jsonl").unlink()
    (matrix_dir / "E4M3-grid" / "summary.json").write_text(json.dumps({"status": "nan_stop"}))  # finished
    (matrix_dir / "E1M6-adamw" / "summary.json").unlink()  # interrupted after a checkpoint
    (matrix_dir / "E1M6-adamw" / "checkpoints").mkdir()
    (matrix_dir / "E1M6-adamw" / "checkpoints" / "step_3.pt").write_bytes(b"")
    (matrix_dir / "E1M6-grid" / "summary.json").write_text(json.dumps({"status": "failed"}))  # no checkpoint
    result = run_matrix(grid, run_cell=fakes.fake_cell)
    assert (result.completed, result.failed, result.skipped) == (2, 0, 5)
    assert {c["name"]: c["resume"] for c in fakes.calls(matrix_dir)} == {
        "E1M6-adamw": True,
        "E1M6-grid": False,
    }
    assert all(cell["status"] == "completed" for cell in read_matrix(tmp_path)["cells"])


def test_a_failing_cell_is_recorded_and_the_others_go_on(tmp_path, fakes):
    grid = write_grid(tmp_path)
    (tmp_path / "runs" / "m").mkdir(parents=True)
    (tmp_path / "runs" / "m" / "plan.json").write_text(
        json.dumps({"E4M3-grid": "raise", "E1M6-adamw": "failed"})
    )
    result = run_matrix(grid, run_cell=fakes.fake_cell)
    assert (result.completed, result.failed) == (5, 2)
    cells = {cell["name"]: cell for cell in read_matrix(tmp_path)["cells"]}
    assert cells["E4M3-grid"]["status"] == "failed"
    assert cells["E4M3-grid"]["error"] == "RuntimeError: synthetic failure in E4M3-grid"
    assert cells["E1M6-adamw"]["error"] == "the run ended with status 'failed'"
    assert cells["fp32"]["status"] == "completed" and cells["fp32"]["error"] is None


def test_a_run_folder_from_a_different_config_is_not_reused(tmp_path, fakes):
    grid = write_grid(tmp_path)
    run_matrix(grid, run_cell=fakes.fake_cell)
    write_grid(tmp_path, base={**TINY, "train": {"max_steps": 9}})
    result = run_matrix(grid, run_cell=fakes.fake_cell)
    assert (result.completed, result.failed, result.skipped) == (0, 7, 0)
    error = read_matrix(tmp_path)["cells"][0]["error"]
    assert "holds a run of a different config (differs in train.max_steps)" in error


def test_an_interrupted_matrix_leaves_no_cell_running(tmp_path, fakes):
    grid = write_grid(tmp_path)
    (tmp_path / "runs" / "m").mkdir(parents=True)
    (tmp_path / "runs" / "m" / "plan.json").write_text(json.dumps({"E1M6-adamw": "interrupt"}))
    with pytest.raises(KeyboardInterrupt):
        run_matrix(grid, run_cell=fakes.fake_cell)
    statuses = [cell["status"] for cell in read_matrix(tmp_path)["cells"]]
    assert statuses == ["completed", "completed", "pending", "pending", "pending", "pending", "pending"]


def test_matrix_json_is_replaced_atomically(tmp_path, monkeypatch):
    from altgrad.experiments.grid import load_grid

    grid = load_grid(write_grid(tmp_path))
    path = write_matrix_json(grid, [])
    before = path.read_text()

    def broken_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(jsonio.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_matrix_json(grid, [{"name": "x"}])
    assert path.read_text() == before
    assert os.listdir(path.parent) == ["matrix.json"]  # no temporary file left behind


def test_parallel_jobs_run_cells_in_spawned_processes(tmp_path, fakes):
    result = run_matrix(write_grid(tmp_path), jobs=2, run_cell=fakes.fake_cell)
    assert (result.completed, result.failed) == (7, 0)
    calls = fakes.calls(tmp_path / "runs" / "m")
    assert len(calls) == 7 and os.getpid() not in {call["pid"] for call in calls}
    assert {call["threads"] for call in calls} == {max(1, runner._cores() // 2)}
    assert all(cell["status"] == "completed" for cell in read_matrix(tmp_path)["cells"])


def test_cli_runs_the_grid_and_points_at_the_report(tmp_path, fakes, monkeypatch, capsys):
    monkeypatch.setattr(runner, "train_cell", fakes.fake_cell)
    parser = argparse.ArgumentParser(prog="altgrad")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["matrix", str(write_grid(tmp_path))])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    matrix_dir = tmp_path / "runs" / "m"
    assert f"matrix folder: {matrix_dir}  (7 completed, 0 failed, 0 already finished" in out
    assert f"altgrad report {matrix_dir}" in out


def test_end_to_end_tiny_grid_with_the_real_trainer(tmp_path, monkeypatch):
    try:
        from altgrad.training.trainer import train  # noqa: F401
    except ImportError as error:
        pytest.skip(f"the trainer does not import yet ({error})")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    base = {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16},
        "train": {"max_steps": 6, "batch_size": 4, "warmup_steps": 2, "eval_interval": 3, "eval_batches": 2},
        "diagnostics": {"rank_interval": 3, "grad_stats_interval": 2, "quant_stats_interval": 2,
                        "optimizer_stats_interval": 3},
        "checkpoint": {"interval": 3, "keep": 1},
    }  # fmt: skip
    axes = {"quant.weight,quant.activation": ["E4M3", "E3M4"], "optimizer.name": ["adamw", "manifold_adamw"]}
    grid = write_grid(tmp_path, base=base, axes=axes, baselines={})
    result = run_matrix(grid)
    assert (result.completed, result.failed, result.skipped) == (4, 0, 0), read_matrix(tmp_path)
    for cell in read_matrix(tmp_path)["cells"]:
        run_dir = tmp_path / "runs" / "m" / cell["name"]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 6
        assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "config.yaml").is_file()
    (
        tmp_path / "runs" / "m" / "E3M4-adamw" / "summary.json"
    ).unlink()  # as if killed after the last checkpoint
    result = run_matrix(grid)
    assert (result.completed, result.failed, result.skipped) == (1, 0, 3)
    assert json.loads((tmp_path / "runs" / "m" / "E3M4-adamw" / "summary.json").read_text())["steps"] == 6


def test_a_cell_stopped_by_a_signal_stops_the_matrix_and_the_rerun_picks_it_up(
    tmp_path, fakes, monkeypatch, capsys
):
    monkeypatch.setattr(runner, "train_cell", fakes.fake_cell)
    grid = write_grid(tmp_path)
    matrix_dir = tmp_path / "runs" / "m"
    matrix_dir.mkdir(parents=True)
    (matrix_dir / "plan.json").write_text(json.dumps({"E1M6-adamw": "interrupted"}))
    parser = argparse.ArgumentParser(prog="altgrad")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["matrix", str(grid)])
    assert args.handler(args) == 143
    err = capsys.readouterr().err
    assert f"matrix interrupted by SIGTERM; 5 cells left; run `altgrad matrix {grid}` again" in err
    statuses = [cell["status"] for cell in read_matrix(tmp_path)["cells"]]
    assert statuses == ["completed", "completed", "pending", "pending", "pending", "pending", "pending"]
    assert len(fakes.calls(matrix_dir)) == 3  # no cell started after the stop

    (matrix_dir / "plan.json").unlink()
    result = run_matrix(grid, run_cell=fakes.fake_cell)
    assert (result.completed, result.failed, result.skipped, result.interrupted_by) == (5, 0, 2, None)
    assert [call["name"] for call in fakes.calls(matrix_dir)][3] == "E1M6-adamw"


def test_sigterm_to_the_runner_stops_its_workers_at_a_step_boundary(tmp_path):
    """A real grid in 2 spawned workers; SIGTERM to the runner alone; the rerun finishes every cell."""
    env = {**os.environ, "PYTHONPATH": str(Path(runner.__file__).parents[2]), "WANDB_MODE": "disabled"}
    base = {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16},
        "train": {"max_steps": 40, "batch_size": 4, "warmup_steps": 2, "eval_interval": 20},
        "checkpoint": {"interval": 1000},
        "logging": {"progress": False},
    }
    grid = write_grid(tmp_path, base=base, axes={"quant.weight": ["E4M3", "E5M2", "E3M4"]}, baselines={})
    process = subprocess.Popen(
        [sys.executable, "-m", "altgrad", "matrix", str(grid), "--jobs", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    matrix_dir = tmp_path / "runs" / "m"
    deadline = time.monotonic() + 180
    while not any(path.read_text().count("\n") >= 3 for path in matrix_dir.glob("*/metrics.jsonl")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=180)
    assert process.returncode == 143, err
    assert "Traceback" not in err and "matrix interrupted by SIGTERM" in err
    summaries = [json.loads(path.read_text()) for path in matrix_dir.glob("*/summary.json")]
    assert summaries and all(s["status"] in ("interrupted", "completed") for s in summaries)
    assert any(s["status"] == "interrupted" and s["signal"] == "SIGTERM" for s in summaries)

    result = run_matrix(grid)
    assert result.completed + result.skipped == 3 and result.failed == 0
    for cell in read_matrix(tmp_path)["cells"]:
        assert json.loads((matrix_dir / cell["name"] / "summary.json").read_text())["steps"] == 40


def test_a_run_folder_differing_only_in_logging_keys_is_the_same_cell(tmp_path, fakes):
    """Folders written before the grid set W&B group and tags (or with another progress setting)."""
    grid = write_grid(tmp_path)
    run_matrix(grid, run_cell=fakes.fake_cell)
    saved = tmp_path / "runs" / "m" / "E4M3-adamw" / "config.yaml"
    config = yaml.safe_load(saved.read_text())
    config["logging"] = {"progress": True}
    saved.write_text(yaml.safe_dump(config))
    cell = runner.load_grid(grid).cells[0]
    assert runner.plan_cell(cell) == ("skip", None)
    config["train"]["max_steps"] = 6
    saved.write_text(yaml.safe_dump(config))
    assert (
        runner.plan_cell(cell)[0] == "conflict" and "differs in train.max_steps)" in runner.plan_cell(cell)[1]
    )


def test_without_matrix_json_the_report_does_not_take_wandb_tags_for_an_axis(tmp_path, fakes):
    from altgrad.analysis.matrix import load_matrix

    run_matrix(write_grid(tmp_path, baselines={}), run_cell=fakes.fake_cell)
    (tmp_path / "runs" / "m" / "matrix.json").unlink()
    cells = load_matrix(tmp_path / "runs" / "m").cells
    assert len(cells) == 6
    assert {key for cell in cells for key in cell.assignment} == {
        "quant.weight",
        "quant.activation",
        "optimizer.name",
    }
