"""Failure attribution: each criterion on synthetic run records with known numbers, then the five labels
from real tiny runs (a 2-layer, 32-wide GPT, tens of steps)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from altgrad.analysis.failure import (
    DIVERGENCE,
    FORWARD,
    GRADIENT,
    NONE,
    OPTIMIZER,
    FailureFinding,
    classify_failure,
)
from altgrad.analysis.report import write_report
from altgrad.analysis.runs import load_run
from altgrad.training.config import load_config
from altgrad.training.trainer import train


def _run(synth, tmp_path, name, records, config=None, events=()):
    return load_run(synth.write_run(tmp_path / name, config, records, list(events)))


# ---- synthetic records ---------------------------------------------------------------------------------


def test_exploding_loss_is_divergence_and_is_checked_first(tmp_path, synth):
    records = synth.metric_records(20, grad_underflow=0.9)
    for record in records:
        if record["step"] >= 10:
            record["train_loss"] = 9.0
    finding = classify_failure(_run(synth, tmp_path, "explode", records))
    assert (finding.mode, finding.step) == (DIVERGENCE, 10)
    assert "also gradient fidelity from step 1" in finding.evidence


def test_nonfinite_loss_is_divergence_with_the_stop_layers(tmp_path, synth):
    records = synth.metric_records(15)
    records[-1]["train_loss"] = math.nan
    events = [{"step": 15, "kind": "nan_stop", "message": "non-finite loss", "layers": ["h.1.mlp"]}]
    finding = classify_failure(_run(synth, tmp_path, "nan", records, events=events))
    assert (finding.mode, finding.step, finding.layers) == (DIVERGENCE, 15, ["h.1.mlp"])


def test_a_short_loss_spike_is_not_divergence(tmp_path, synth):
    records = synth.metric_records(20)
    for record in records:
        if record["step"] in (6, 7):
            record["train_loss"] = 9.0
    assert classify_failure(_run(synth, tmp_path, "spike", records)).mode == NONE


def test_forward_cost_names_the_worst_layer(tmp_path, synth):
    records = synth.metric_records(
        20,
        forward_cost=lambda step: 0.05 if step >= 10 else 0.0,
        weight_rel_error=0.2,
        first_layer_only=True,
        stall=0.99,
    )
    finding = classify_failure(_run(synth, tmp_path, "forward", records))
    assert (finding.mode, finding.step, finding.layers[0]) == (FORWARD, 10, synth.LAYERS[0])
    assert "0.05 nats" in finding.evidence and "weight rel_error 0.2" in finding.evidence


def test_forward_cost_on_one_eval_is_not_material(tmp_path, synth):
    records = synth.metric_records(20, forward_cost=lambda step: 0.05 if step == 10 else 0.0)
    assert classify_failure(_run(synth, tmp_path, "once", records)).mode == NONE


def test_forward_cost_relative_to_the_gap_to_an_fp32_baseline(tmp_path, synth):
    """0.015 nats is below the absolute threshold, but most of a 0.02 gap to fp32."""
    records = synth.metric_records(20, loss_start=4.02, forward_cost=0.015)
    baseline = _run(synth, tmp_path, "fp32", synth.metric_records(20, loss_start=4.0, quantized=False))
    run = _run(synth, tmp_path, "small", records)
    assert classify_failure(run).mode == NONE
    assert (classify_failure(run, baseline).mode, classify_failure(run, baseline).step) == (FORWARD, 5)
    far = _run(synth, tmp_path, "far", synth.metric_records(20, loss_start=4.5, forward_cost=0.015))
    assert classify_failure(far, baseline).mode == NONE  # 0.015 of a 0.5 gap does not explain it


def test_gradient_fidelity_counts_recorded_steps_only(tmp_path, synth):
    """Quant statistics every 5 steps, flips every step: the streak runs over the recorded steps."""
    records = synth.metric_records(20, grad_underflow=0.9, first_layer_only=True)
    for record in records:
        if record["step"] % 5:
            for key in [k for k in record if k.startswith("quant/")]:
                del record[key]
    finding = classify_failure(_run(synth, tmp_path, "grad", records))
    assert (finding.mode, finding.step, finding.layers[0]) == (GRADIENT, 5, synth.LAYERS[0])
    assert "0.9 of its gradient elements" in finding.evidence


def test_stall_is_an_optimizer_failure_only_with_weights_stored_in_the_format(tmp_path, synth):
    records = synth.metric_records(20, stall=lambda step: 0.99 if step >= 12 else 0.5, first_layer_only=True)
    master = classify_failure(
        _run(synth, tmp_path, "master", records, {"optimizer": {"weight_storage": None}})
    )
    assert master.mode == NONE and "grid coarseness" in master.evidence
    stored = classify_failure(
        _run(synth, tmp_path, "stored", records, {"optimizer": {"weight_storage": "E4M3"}})
    )
    assert (stored.mode, stored.step, stored.layers[0]) == (OPTIMIZER, 12, synth.LAYERS[0])


def test_stall_in_the_warmup_or_the_decayed_tail_is_not_a_failure(tmp_path, synth):
    stored = {"optimizer": {"weight_storage": "E4M3"}, "train": {"warmup_steps": 6}}
    warmup = synth.metric_records(20, stall=lambda step: 0.99 if step <= 6 else 0.5)
    assert classify_failure(_run(synth, tmp_path, "warmup", warmup, stored)).mode == NONE
    decayed = synth.metric_records(20, stall=lambda step: 0.99 if step >= 12 else 0.5)
    for record in decayed:  # the lr decays to a tenth of its peak from step 11 on
        record["lr"] = 1e-3 if record["step"] <= 10 else 1e-4
    assert classify_failure(_run(synth, tmp_path, "decayed", decayed, stored)).mode == NONE


def test_missing_evidence_is_named_not_read_as_healthy(tmp_path, synth):
    finding = classify_failure(_run(synth, tmp_path, "bare", synth.metric_records(20, quantized=False)))
    assert finding.mode == NONE
    assert "not assessed (no data recorded): forward precision, gradient fidelity, optimizer update" in (
        finding.evidence
    )


def test_report_writes_analysis_json(tmp_path, synth):
    records = synth.metric_records(20, forward_cost=0.05)
    path = synth.write_run(
        tmp_path / "r", synth.config_for("r"), records, [], synth.summary_from(records, "r")
    )
    write_report(path)
    analysis = json.loads((path / "analysis.json").read_text(), parse_constant=pytest.fail)
    assert analysis == {"failure": classify_failure(load_run(path)).to_dict()}
    assert analysis["failure"]["mode"] == FORWARD and analysis["failure"]["step"] == 5
    assert "Failure analysis" in (path / "report.md").read_text()


# ---- real tiny runs ------------------------------------------------------------------------------------

TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "train.batch_size=8",
    "train.warmup_steps=5",
    "train.eval_interval=10",
    "train.eval_batches=2",
    "diagnostics.quant_stats_interval=5",
    "diagnostics.rank_interval=1000",
    "checkpoint.interval=1000",
    "logging.progress=false",
]
REAL_RUNS = {
    "e4m3_adamw": (NONE, ["train.max_steps=40"]),
    "e7m0_master": (FORWARD, ["train.max_steps=30", "quant.weight=E7M0", "quant.activation=E7M0"]),
    "e4m3_stored": (OPTIMIZER, ["train.max_steps=30", "optimizer.weight_storage=E4M3"]),
    "lr_too_high": (DIVERGENCE, ["train.max_steps=20", "train.lr=3", "train.min_lr=3", "train.grad_clip=0"]),
    "grad_e0m7": (GRADIENT, ["train.max_steps=20", "quant.grad=E0M7"]),
}


@pytest.fixture(scope="module")
def real_findings(tmp_path_factory) -> dict[str, FailureFinding]:
    out_dir = tmp_path_factory.mktemp("runs")
    findings = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only contend on a shared CPU
    try:
        for name, (_, overrides) in REAL_RUNS.items():
            config = load_config(None, [*TINY, f"out_dir={out_dir}", f"name={name}", *overrides])
            train(config)
            findings[name] = classify_failure(load_run(config.run_dir))
    finally:
        torch.set_num_threads(threads)
    return findings


@pytest.mark.parametrize("name", list(REAL_RUNS))
def test_real_runs_get_their_label(real_findings, name):
    finding = real_findings[name]
    assert finding.mode == REAL_RUNS[name][0], finding.evidence
    assert (finding.step is None) == (finding.mode == NONE)
    if finding.mode in (FORWARD, GRADIENT, OPTIMIZER):
        assert finding.layers and finding.layers[0] in finding.evidence
