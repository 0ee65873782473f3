"""The run record: the summary computed by hand on small records, and every key a consumer reads
(interventions, analysis, report, docs/run_folder.md) produced by a tiny run with every setting on."""

import math
import re

import pytest

from altgrad.analysis.runs import load_run
from altgrad.analysis.summaries import derived_figures
from altgrad.record import aggregate_key, metric_key, quant_key, summarize
from altgrad.training.config import load_config
from altgrad.training.trainer import Trainer
from tiny_runs import EVERY_DIAGNOSTIC_DUE

pytestmark = pytest.mark.usefixtures("one_thread")


def test_keys_follow_the_documented_grammar():
    assert metric_key("flips", "h.0.attn") == "flips/h.0.attn"
    assert aggregate_key("stall_ratio", "mean") == "stall_ratio/mean"
    assert quant_key("rel_error", "weight", "h.0.mlp") == "quant/rel_error/h.0.mlp/weight"
    assert quant_key("rel_error", "grad") == "quant/rel_error/grad"
    with pytest.raises(ValueError, match="how"):
        aggregate_key("stall_ratio", "median")


def test_summary_by_hand():
    # layer a: 10 updates over two records, 3 + 1 updated flips -> 1 - 4/10 = 0.6
    # layer b: 4 updates, 0 updated flips -> 1.0; layer c never updated: left out. Mean 0.8
    metrics = [
        {"step": 1, "train_loss": 3.0, "tokens_per_s": 100.0, "flips/total": 4,
         "stall_ratio/a": 0.5, "updates/a": 6, "stall_ratio/b": 1.0, "updates/b": 4,
         "stall_ratio/c": 0.0, "updates/c": 0, "stable_rank/min": 5.0},
        {"step": 2, "train_loss": 2.0, "tokens_per_s": 300.0, "flips/total": 1, "val_loss": 2.5,
         "stall_ratio/a": 0.75, "updates/a": 4, "effective_rank/x.weight": 7.0},
        {"step": 3, "train_loss": None, "tokens_per_s": 200.0, "val_loss": math.nan,
         "stable_rank/min": math.nan},
    ]  # fmt: skip
    events = [
        {"step": 2, "kind": "rank_warning", "message": "w"},
        {"step": 3, "kind": "nan_stop", "message": "non-finite loss at step 3"},
    ]
    figures = summarize(metrics, events)
    assert figures["final_train_loss"] is None and figures["best_train_loss"] == 2.0
    assert figures["final_val_loss"] == 2.5 and figures["final_val_ppl"] == pytest.approx(math.exp(2.5))
    assert figures["tokens_per_s"] == 200.0  # the median window
    assert figures["total_flips"] == 5  # flips logged at steps 1 and 2, from step 1 on
    assert figures["mean_stall_ratio"] == pytest.approx(0.8)
    assert figures["min_stable_rank"] == 5.0 and figures["min_effective_rank"] == 7.0
    assert (figures["first_rank_warning_step"], figures["collapse_step"]) == (2, 3)
    assert figures["collapse_reason"] == "non-finite loss at step 3"
    sampled = [{"step": 2, "flips/total": 4}, {"step": 4, "flips/total": 1}]
    assert summarize(sampled, [])["total_flips"] is None  # not every step: no total


EVERYTHING_ON = [
    *EVERY_DIAGNOSTIC_DUE,
    "stability.format_shift=true",
    "stability.shift_warmup_steps=0",
    "stability.relative_grad_clip=0.01",
]

CONSUMED = {
    # altgrad.analysis (summaries, failure, run_report, matrix_report) and the report's figures
    "train_loss": "analysis", "val_loss": "analysis", "val_ppl": "analysis", "lr": "failure",
    "val_loss_fp32_forward": "failure", "tokens_per_s": "summary", "flips/total": "summary",
    "updates/{layer}": "summary", "stall_ratio/{layer}": "summary, failure, report",
    "stall_ratio/mean": "report", "flip_rate/mean": "matrix report",
    "stable_rank/min": "summary", "effective_rank/min": "summary", "stable_rank/{param}": "report",
    "effective_rank/{param}": "report", "quant/overflow_frac/{kind}": "report",
    "quant/underflow_frac/{kind}": "report", "quant/rel_error/{layer}/{kind}": "failure",
    "quant/underflow_frac/{layer}/{kind}": "failure", "quant/overflow_frac/{layer}/{kind}": "failure",
    "quant/nonfinite_frac/{layer}/weight": "docs: the format shift's NaN trigger",
}  # fmt: skip
"""Each key pattern a consumer reads, and who reads it."""


def pattern(key):
    return re.compile(re.sub(r"\\\{(layer|param|kind)\\\}", "[^/]+", re.escape(key)) + "$")


@pytest.fixture(scope="module")
def everything_run(tmp_path_factory):
    config = load_config(None, [*EVERYTHING_ON, f"out_dir={tmp_path_factory.mktemp('runs')}", "name=all"])
    trainer = Trainer(config)
    summary = trainer.run()
    return trainer, summary, load_run(config.run_dir)


def test_every_key_a_consumer_reads_is_written(everything_run):
    _, _, run = everything_run
    written = set(run.metrics.columns)
    missing = [key for key in CONSUMED if not any(pattern(key).match(k) for k in written)]
    assert not missing, f"read but never written: {missing}"


def test_the_interventions_read_typed_values(everything_run):
    trainer, _, _ = everything_run
    flips, quant = trainer.components["flips"], trainer.components["quant_stats"]
    tracked = set(trainer.tracked)
    assert set(flips.last_counts) == tracked
    assert all(0 <= c["stall_ratio"] <= 1 for c in flips.last_counts.values())
    assert set(quant.last.nonfinite_fracs("weight")) == tracked  # step 4 measured them: none non-finite
    assert set(quant.last.nonfinite_fracs("weight").values()) == {0.0}


def test_the_trainer_and_the_analysis_compute_the_same_summary(everything_run):
    _, summary, run = everything_run
    derived = derived_figures(run)
    for name, value in derived.items():
        if name != "format_shifts":
            assert summary[name] == value or (value != value and summary[name] is None), name
