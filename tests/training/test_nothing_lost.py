"""Run folders, interrupts and resumes that never destroy a result (issue 11), on a 1-layer model.

The reference for every resume is an uninterrupted run of the same config: metrics equal bit for
bit (timing columns aside).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import altgrad
from altgrad.cli import main
from altgrad.training.checkpoint import CheckpointError, checkpoint_steps
from altgrad.training.config import load_config
from altgrad.training.run_folder import RunExistsError
from altgrad.training.trainer import Trainer, resume, train
from tiny_runs import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    *TINY_MODEL,
    "train.max_steps=10",
    "train.warmup_steps=2",
    "train.eval_interval=5",
    "train.eval_batches=1",
    "diagnostics.rank_interval=5",
    "diagnostics.grad_stats_interval=2",
    "diagnostics.quant_stats_interval=2",
    "diagnostics.optimizer_stats_interval=5",
    "checkpoint.interval=4",
    "checkpoint.keep=3",
    "logging.progress=false",
]
TIMING_KEYS = {"tokens_per_s", "elapsed_s"}


def tiny_config(tmp_path, *overrides):
    return load_config(None, [*TINY, f"out_dir={tmp_path}", *overrides])


def cli_args(tmp_path, *overrides):
    return [f"--set={item}" for item in [*TINY, f"out_dir={tmp_path}", *overrides]]


def strict_json(text):
    """Python's json.loads, but refusing the NaN/Infinity literals that strict JSON has not."""
    return json.loads(text, parse_constant=lambda literal: pytest.fail(f"non-strict JSON literal {literal}"))


def metrics_without_timing(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in strict_json(line).items() if k not in TIMING_KEYS} for line in lines]


def summary_of(run_dir):
    return strict_json((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 10-step run."""
    config = tiny_config(tmp_path_factory.mktemp("reference"), "name=ref")
    train(config)
    return config.run_dir


def in_backward_of(step, action):
    """A ``_train_step`` that calls ``action()`` from inside the backward pass of ``step``."""
    real_step = Trainer._train_step

    def train_step(self, measure):
        if self.step + 1 == step:  # after this step's forward has updated the amax histories
            self.model.lm_head.weight.register_hook(lambda grad: action())
        return real_step(self, measure)

    return train_step


def raise_keyboard_interrupt():
    raise KeyboardInterrupt


def send_sigint():
    os.kill(os.getpid(), signal.SIGINT)


# ---- a run name that holds a run ---------------------------------------------------------------------------


def test_a_fresh_run_never_replaces_a_run_without_overwrite(tmp_path, capsys):
    config = tiny_config(tmp_path, "name=kept", "train.max_steps=3")
    train(config)
    before = {name: (config.run_dir / name).read_bytes() for name in ("metrics.jsonl", "summary.json")}
    with pytest.raises(RunExistsError, match="already holds a run"):
        train(tiny_config(tmp_path, "name=kept", "train.max_steps=2"))
    assert main(["train", *cli_args(tmp_path, "name=kept", "train.max_steps=2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(config.run_dir) in err
    assert "--resume" in err and "--set name=" in err and "--overwrite" in err
    assert {name: (config.run_dir / name).read_bytes() for name in before} == before
    assert checkpoint_steps(config.run_dir / "checkpoints") == [3]

    assert main(["train", "--overwrite", *cli_args(tmp_path, "name=kept", "train.max_steps=2")]) == 0
    assert summary_of(config.run_dir)["steps"] == 2
    assert checkpoint_steps(config.run_dir / "checkpoints") == [2]


def test_a_data_error_leaves_no_run_folder(tmp_path, capsys):
    overrides = ["name=nodata", "data.source=text", f"data.path={tmp_path / 'missing.txt'}"]
    assert main(["train", *cli_args(tmp_path, *overrides)]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert not (tmp_path / "nodata").exists()


# ---- interrupts --------------------------------------------------------------------------------------------


def test_keyboard_interrupt_in_the_backward_pass_never_saves_the_half_done_step(
    tmp_path, reference, monkeypatch
):
    config = tiny_config(tmp_path, "name=ref")
    monkeypatch.setattr(Trainer, "_train_step", in_backward_of(7, raise_keyboard_interrupt))
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.undo()
    # step 7's forward had already updated the amax histories: only the step-4 checkpoint stands
    assert checkpoint_steps(config.run_dir / "checkpoints") == [4]
    summary = summary_of(config.run_dir)
    assert summary["status"] == "interrupted" and summary["steps"] == 6

    assert resume(config.run_dir)["status"] == "completed"
    assert metrics_without_timing(config.run_dir) == metrics_without_timing(reference)


def test_sigint_in_the_backward_pass_stops_after_that_step_and_resumes_exactly(
    tmp_path, reference, monkeypatch
):
    config = tiny_config(tmp_path, "name=ref")
    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(Trainer, "_train_step", in_backward_of(7, send_sigint))
    summary = train(config)
    monkeypatch.undo()
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT" and summary["steps"] == 7
    assert checkpoint_steps(config.run_dir / "checkpoints") == [4, 7]  # step 7 completed, then the stop
    events = [strict_json(line) for line in (config.run_dir / "events.jsonl").read_text().splitlines()]
    assert "resume with: altgrad train --resume" in events[-1]["message"]
    assert signal.getsignal(signal.SIGINT) is handler  # the run gives the handler back

    assert resume(config.run_dir)["status"] == "completed"
    assert metrics_without_timing(config.run_dir) == metrics_without_timing(reference)


def test_sigterm_stops_a_cli_run_with_exit_143_and_the_resume_completes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(altgrad.__file__).parents[1]), "WANDB_MODE": "disabled"}
    overrides = ["name=preempted", "train.max_steps=100000", "train.log_interval=1"]
    overrides.append("checkpoint.interval=1000")
    process = subprocess.Popen(
        [sys.executable, "-m", "altgrad", "train", *cli_args(tmp_path, *overrides)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "preempted" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "Traceback" not in err
    hint = f"resume with: altgrad train --resume {tmp_path / 'preempted'}"
    assert err.strip().splitlines()[-1].endswith(hint)
    summary = summary_of(tmp_path / "preempted")
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    steps = summary["steps"]
    assert checkpoint_steps(tmp_path / "preempted" / "checkpoints") == [steps]

    resumed = resume(tmp_path / "preempted", overrides=[f"train.max_steps={steps + 2}"])
    assert resumed["status"] == "completed" and resumed["steps"] == steps + 2
    assert [r["step"] for r in metrics_without_timing(tmp_path / "preempted")] == list(range(1, steps + 3))


# ---- resuming a finished run -------------------------------------------------------------------------------


def test_resume_of_a_completed_run_changes_nothing(tmp_path, capsys):
    config = tiny_config(tmp_path, "name=done", "train.max_steps=4")
    train(config)
    files = ("metrics.jsonl", "events.jsonl", "summary.json", "config.yaml", "checkpoints/step_4.pt")
    before = {name: (config.run_dir / name).read_bytes() for name in files}
    assert resume(config.run_dir) == summary_of(config.run_dir)
    assert main(["train", "--resume", str(config.run_dir)]) == 0
    assert "already complete (4 steps); nothing changed" in capsys.readouterr().out
    assert {name: (config.run_dir / name).read_bytes() for name in files} == before


def test_resume_to_a_larger_max_steps_keeps_every_earlier_figure(tmp_path):
    config = tiny_config(tmp_path, "name=longer", "train.max_steps=5")
    first = train(config)
    earlier = metrics_without_timing(config.run_dir)
    summary = resume(config.run_dir, overrides=["train.max_steps=8"])
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert metrics_without_timing(config.run_dir)[:5] == earlier
    assert summary["best_val_loss"] <= first["best_val_loss"]
    assert summary["final_train_loss"] == metrics_without_timing(config.run_dir)[-1]["train_loss"]
    assert summary["wall_time_s"] > first["wall_time_s"]  # this session's time added to the first's


# ---- damaged checkpoints -----------------------------------------------------------------------------------


def test_a_truncated_latest_checkpoint_falls_back_to_the_newest_valid_one(tmp_path, reference, capsys):
    config = tiny_config(tmp_path, "name=ref")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_train_step", in_backward_of(9, send_sigint))
        train(config)
    latest = config.run_dir / "checkpoints" / "step_9.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # a disk that filled up mid-write

    assert resume(config.run_dir)["status"] == "completed"
    assert f"skipped {latest}: unreadable" in capsys.readouterr().err
    events = [strict_json(line) for line in (config.run_dir / "events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "alert" and str(latest) in e["message"] for e in events)
    assert metrics_without_timing(config.run_dir) == metrics_without_timing(reference)


def test_no_valid_checkpoint_is_one_line_naming_the_files(tmp_path, capsys):
    config = tiny_config(tmp_path, "name=broken", "train.max_steps=8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_train_step", in_backward_of(6, send_sigint))
        train(config)
    for step in (4, 6):
        (config.run_dir / "checkpoints" / f"step_{step}.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="tried step_4.pt, step_6.pt"):
        resume(config.run_dir)
    assert main(["train", "--resume", str(config.run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("altgrad: error: no readable checkpoint") and "\n" not in err


# ---- strict JSON, user errors, unusual formats -------------------------------------------------------------


def test_a_nan_stop_run_writes_strict_json(tmp_path):
    config = tiny_config(
        tmp_path, "name=nan", "train.lr=1e6", "train.min_lr=1e6", "train.warmup_steps=0", "train.grad_clip=0",
        "quant.enabled=false", "train.weight_decay=0",
    )  # fmt: skip
    summary = train(config)
    assert summary["status"] == "nan_stop"
    stored = summary_of(config.run_dir)
    assert stored["final_train_loss"] is None  # NaN is written as null
    for name in ("metrics.jsonl", "events.jsonl"):
        for line in (config.run_dir / name).read_text().splitlines():
            strict_json(line)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("model:\n  n_layer: [unclosed\n", ":3:1: not valid YAML"),
        ("train: {max_steps: 5\nseed: 1\n", ":2:5: not valid YAML"),
    ],
)
def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, capsys, text, where):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}{where}" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "missing.yaml"], "config file not found: missing.yaml"),
        (["train", "--set", "train.max_steps=-1"], "train.max_steps"),
        (["train", "--set", "model.n_layer=[1"], "override 'model.n_layer=[1'"),
        (["train", "--resume", "."], "not a run folder (no config.yaml): ."),
    ],
)
def test_user_errors_are_one_line_and_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("altgrad: error: ")


def test_a_real_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(self, measure):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Trainer, "_train_step", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", *cli_args(tmp_path, "name=bug", "train.max_steps=2")])
    assert summary_of(tmp_path / "bug")["status"] == "failed"


def test_a_format_that_is_not_8_bits_wide_is_announced(tmp_path, capsys):
    config = tiny_config(tmp_path, "name=wide", "train.max_steps=1", "quant.weight=E4M4", "quant.grad=E3M3")
    train(config)
    err = capsys.readouterr().err
    assert "format E4M4 is 9 bits wide, not 8" in err and "format E3M3 is 7 bits wide, not 8" in err
    events = [strict_json(line) for line in (config.run_dir / "events.jsonl").read_text().splitlines()]
    alerts = [e["message"] for e in events if e["kind"] == "alert"]
    assert any("E4M4 is 9 bits wide" in message for message in alerts)
    assert not [line for line in err.splitlines() if "bits wide" in line and "E4M3" in line]


def test_overwriting_a_run_also_drops_its_tensorboard_events_and_wandb_id(tmp_path):
    from altgrad.training.loggers import WANDB_ID_FILE
    from altgrad.training.run_folder import RunFolder

    run_dir = tmp_path / "run"
    (run_dir / "tensorboard").mkdir(parents=True)
    (run_dir / "tensorboard" / "events.out.tfevents.1").write_text("old curves")
    (run_dir / WANDB_ID_FILE).write_text("abc123")
    (run_dir / "notes.txt").write_text("the user's own file")
    RunFolder(run_dir).start_fresh()
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]
