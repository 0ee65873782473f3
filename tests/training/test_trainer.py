"""End-to-end runs of the trainer on a tiny model (2 layers, 64 wide, a few dozen steps)."""

import json
import math
import sys
import types

import pandas as pd
import pytest

from altgrad.training.config import load_config
from altgrad.training.trainer import Trainer, resume, train

TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "model.block_size=32",
    "train.batch_size=8",
    "train.max_steps=40",
    "train.warmup_steps=5",
    "train.eval_interval=20",
    "train.eval_batches=2",
    "diagnostics.rank_interval=10",
    "diagnostics.grad_stats_interval=5",
    "diagnostics.quant_stats_interval=5",
    "diagnostics.optimizer_stats_interval=10",
    "checkpoint.interval=20",
    "logging.progress=false",
]
TIMING_KEYS = {"tokens_per_s", "elapsed_s"}


def tiny_config(tmp_path, *overrides):
    return load_config(None, [*TINY, f"out_dir={tmp_path}", *overrides])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("runs")
    config = tiny_config(tmp_path, "name=tiny")
    return config, train(config)


def test_loss_falls_and_the_run_folder_is_complete(default_run):
    config, summary = default_run
    run_dir = config.run_dir
    assert summary["status"] == "completed" and summary["steps"] == 40
    metrics = pd.read_json(run_dir / "metrics.jsonl", lines=True)
    first, last = metrics["train_loss"].iloc[:3].mean(), metrics["train_loss"].iloc[-3:].mean()
    assert last < first - 0.5, (first, last)
    for name in ("config.yaml", "events.jsonl", "summary.json"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "checkpoints" / "step_40.pt").exists()
    assert summary["final_val_loss"] is not None and math.isfinite(summary["final_val_loss"])
    assert summary["precision"] == "fp32"


def test_predicted_stall_is_close_to_the_measured_one(default_run):
    # fp32 master weights sit anywhere in their grid cells: 1 - mean(min(1, |dw|/ulp)) predicts the
    # measured stall (a 100-step run of this model: mean |difference| 0.001, largest 0.004)
    config, _ = default_run
    records = read_jsonl(config.run_dir / "metrics.jsonl")
    differences = [abs(r["predicted_stall_ratio/mean"] - r["stall_ratio/mean"]) for r in records]
    assert sum(differences) / len(differences) < 0.005 and max(differences) < 0.015
    assert 0.3 < records[-1]["stall_ratio/mean"] < 0.95  # a regime where the prediction has work to do


def test_jsonl_keys_are_present_and_finite(default_run):
    config, _ = default_run
    records = read_jsonl(config.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 41))
    layer = "transformer.h.0.attn.c_attn"
    every_step = [
        "train_loss",
        "lr",
        f"flips/{layer}",
        f"updates/{layer}",
        f"stall_ratio/{layer}",
        "stall_ratio/mean",
        "flips/total",
        "flip_rate/mean",
    ]
    for record in records:
        for key in every_step:
            assert key in record and math.isfinite(record[key]), (record["step"], key)
    at_10 = records[9]
    for key in [
        f"stable_rank/{layer}.weight",
        f"stable_rank_quantized/{layer}.weight",
        f"effective_rank_quantized/{layer}.weight",
        "stable_rank/min",
        "effective_rank/mean",
        "quant/overflow_frac/weight",
        "quant/underflow_frac/activation",
        "quant/overflow_frac/grad",
        f"quant/overflow_frac/{layer}/activation",
        f"grad_norm_l2/{layer}.weight",
        "grad_norm_l2/mean",
    ]:
        assert key in at_10 and math.isfinite(at_10[key]), key
    assert "val_loss" in records[19] and "val_ppl" in records[39]
    for record in records:
        assert 0.0 <= record["stall_ratio/mean"] <= 1.0
        assert record[f"flips/{layer}"] <= record[f"updates/{layer}"] + record[f"drift_flips/{layer}"]


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, default_run, monkeypatch):
    config, _ = default_run
    crashing = tiny_config(tmp_path, "name=tiny")
    real_step = Trainer._train_step

    def crash_at_step_25(self, measure):
        if self.step == 25:
            raise RuntimeError("simulated crash")
        return real_step(self, measure)

    monkeypatch.setattr(Trainer, "_train_step", crash_at_step_25)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashing)
    monkeypatch.undo()
    checkpoints = crashing.run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*.pt")) == ["step_20.pt"]  # a crash saves nothing
    assert json.loads((crashing.run_dir / "summary.json").read_text())["status"] == "failed"

    summary = resume(crashing.run_dir)
    assert summary["steps"] == 40 and summary["status"] == "completed"

    def strip(records):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]

    resumed = strip(read_jsonl(crashing.run_dir / "metrics.jsonl"))
    uninterrupted = strip(read_jsonl(config.run_dir / "metrics.jsonl"))
    assert [r["step"] for r in resumed] == list(range(1, 41))
    assert resumed == uninterrupted


def test_too_high_learning_rate_stops_on_nan(tmp_path):
    config = tiny_config(
        tmp_path,
        "name=nan",
        "train.lr=1e6",
        "train.min_lr=1e6",
        "train.warmup_steps=0",
        "train.grad_clip=0",
        "quant.enabled=false",
        "train.weight_decay=0",
    )
    summary = train(config)
    assert summary["status"] == "nan_stop"
    assert summary["collapse_step"] == summary["steps"] < 40
    events = read_jsonl(config.run_dir / "events.jsonl")
    stop = [e for e in events if e["kind"] == "nan_stop"]
    assert len(stop) == 1 and stop[0]["step"] == summary["steps"]
    assert (config.run_dir / "checkpoints" / f"step_{summary['steps']}.pt").exists()


def test_cli_exit_codes(tmp_path, capsys):
    from altgrad.cli import main

    assert main(["train", "--set", "quant.weight=E9M9"]) == 2
    assert "config key 'quant.weight'" in capsys.readouterr().err
    overrides = [
        f"--set={o}"
        for o in [*TINY, f"out_dir={tmp_path}", "name=cli", "train.max_steps=4", "train.eval_interval=2"]
    ]
    assert main(["train", *overrides]) == 0
    assert "run folder:" in capsys.readouterr().out
    run_dir = tmp_path / "cli"
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 and (run_dir / "report.md").exists()


def test_tensorboard_and_wandb_sinks_log_the_same_steps(tmp_path, monkeypatch):
    logged = []

    class FakeRun:
        def log(self, values, step):
            logged.append(step)

        def finish(self):
            pass

    fake_wandb = types.SimpleNamespace(init=lambda **kwargs: FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    config = tiny_config(
        tmp_path, "name=sinks", "train.max_steps=6", "logging.wandb=offline", "logging.tensorboard=true"
    )
    train(config)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(config.run_dir / "tensorboard"))
    events.Reload()
    tensorboard_steps = [event.step for event in events.Scalars("train_loss")]
    jsonl_steps = [r["step"] for r in read_jsonl(config.run_dir / "metrics.jsonl")]
    assert tensorboard_steps == jsonl_steps == logged == list(range(1, 7))


def test_stability_interventions_are_recorded(tmp_path):
    config = tiny_config(
        tmp_path, "name=stability", "train.max_steps=8", "stability.relative_grad_clip=1e-6",
        "stability.format_shift=true", "stability.shift_patience=2", "stability.shift_warmup_steps=0",
        "stability.shift_stall_threshold=0.01",
    )  # fmt: skip
    summary = train(config)
    events = read_jsonl(config.run_dir / "events.jsonl")
    kinds = {e["kind"] for e in events}
    assert {"partition_clip", "format_shift"} <= kinds
    shift = next(e for e in events if e["kind"] == "format_shift")
    assert shift["from"] == "E4M3" and shift["to"] == "E3M4" and shift["step"] >= 2
    assert summary["format_shifts"] and summary["format_shifts"][0]["layer"] == shift["layer"]
    assert all(count >= 1 for count in summary["partition_clip_steps"].values())


def test_overwrite_replaces_an_older_run_of_the_same_name(tmp_path):
    train(
        tiny_config(tmp_path, "name=again", "train.max_steps=6", "checkpoint.interval=2", "checkpoint.keep=5")
    )
    config = tiny_config(
        tmp_path, "name=again", "train.max_steps=3", "checkpoint.interval=2", "checkpoint.keep=5"
    )
    train(config, overwrite=True)
    assert sorted(p.name for p in (config.run_dir / "checkpoints").glob("step_*.pt")) == [
        "step_2.pt",
        "step_3.pt",
    ]
    assert [r["step"] for r in read_jsonl(config.run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_checkpoints_and_measurements_do_not_depend_on_the_log_interval(tmp_path):
    config = tiny_config(
        tmp_path, "name=sparse", "train.max_steps=10", "train.log_interval=5", "diagnostics.flips=false",
        "checkpoint.interval=3", "checkpoint.keep=10", "diagnostics.grad_stats_interval=4",
        "diagnostics.quant_stats_interval=4", "train.eval_interval=100", "diagnostics.rank_interval=100",
        "diagnostics.optimizer_stats_interval=100",
    )  # fmt: skip
    train(config)
    steps = sorted(int(p.stem.split("_")[1]) for p in (config.run_dir / "checkpoints").glob("step_*.pt"))
    assert steps == [3, 6, 9, 10]
    records = {r["step"]: r for r in read_jsonl(config.run_dir / "metrics.jsonl")}
    assert sorted(records) == [4, 5, 8, 10]  # grad/quant stats at 4 and 8, logging at 5 and 10
    assert "grad_norm_l2/mean" in records[4] and "quant/overflow_frac/weight" in records[8]


def test_resume_refuses_a_changed_tokenizer(tmp_path):
    config = tiny_config(tmp_path, "name=changed", "train.max_steps=4")
    train(config)
    with pytest.raises(ValueError, match="tokenizer differs"):
        resume(config.run_dir, overrides=["data.tokenizer=byte", "train.max_steps=8"])


def test_trains_on_a_local_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(400)]
    datasets.Dataset.from_dict({"body": lines}).save_to_disk(tmp_path / "saved")
    config = tiny_config(
        tmp_path, "name=hf", "train.max_steps=4", "data.source=hf", f"data.path={tmp_path / 'saved'}",
        "data.text_field=body", "data.tokenizer=byte",
    )  # fmt: skip
    summary = train(config)
    assert summary["status"] == "completed" and math.isfinite(summary["final_train_loss"])
