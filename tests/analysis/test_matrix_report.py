"""The matrix report on a synthetic matrix with known outcomes: results and seed aggregates, the gap to
fp32, failure classification, grid-aware vs standard verdicts, equivalent cells, layer rules, failed and
pending cells, self-contained HTML, and the fallback without matrix.json."""

from __future__ import annotations

import json
import math

import pytest

from altgrad.analysis.comparisons import find_equivalent_pairs, optimizer_comparison
from altgrad.analysis.failure import FORWARD, GRADIENT, NONE, thresholds_text
from altgrad.analysis.matrix import load_matrix
from altgrad.analysis.matrix_report import failure_table, write_matrix_report
from altgrad.analysis.report import write_report
from altgrad.analysis.results import aggregate_over_seeds, results_table

IMAGE = "data:image/png;base64,"


def _grad_underflow(step):
    return 0.6 if step >= 8 else 0.0


def _forward_cost(step):
    return 0.05 if step >= 10 else 0.0


def _activation_underflow(step):
    return 0.2 if step >= 5 else 0.0


# name: (format or None for the fp32 baseline, optimizer, seed, loss_start, extra metric_records arguments)
CELLS = {
    "fp32-s0": (None, "adamw", 0, 3.80, {}),
    "fp32-s1": (None, "adamw", 1, 3.82, {}),
    "e4m3-adamw-s0": ("E4M3", "adamw", 0, 4.00, {}),
    "e4m3-adamw-s1": ("E4M3", "adamw", 1, 4.01, {}),
    "e4m3-manifold-s0": ("E4M3", "manifold_adamw", 0, 3.50, {}),
    "e4m3-manifold-s1": ("E4M3", "manifold_adamw", 1, 3.51, {}),
    "e5m2-adamw-s0": (
        "E5M2",
        "adamw",
        0,
        4.00,
        {"grad_underflow": _grad_underflow, "first_layer_only": True},
    ),
    "e5m2-adamw-s1": (
        "E5M2",
        "adamw",
        1,
        4.02,
        {"grad_underflow": _grad_underflow, "first_layer_only": True},
    ),
    "e5m2-manifold-s0": ("E5M2", "manifold_adamw", 0, 4.01, {"grad_underflow": _grad_underflow}),
    "e5m2-manifold-s1": ("E5M2", "manifold_adamw", 1, 4.00, {"grad_underflow": _grad_underflow}),
    "e7m0-adamw-s0": ("E7M0", "adamw", 0, 4.50, {"stall": 0.99, "forward_cost": _forward_cost}),
    "e7m0-grid-s0": ("E7M0", "grid", 0, 4.40, {}),
    "e3m4-adamw-s0": ("E3M4", "adamw", 0, 4.10, {"activation_underflow": _activation_underflow}),
    "e1m6-adamw-s0": ("E1M6", "adamw", 0, 4.20, {}),
    "e0m7-adamw-s0": ("E0M7", "adamw", 0, 4.20, {}),
    "e1m6-adamw-s1": ("E1M6", "adamw", 1, 4.20, {}),
    "e0m7-adamw-s1": ("E0M7", "adamw", 1, 4.30, {}),
}
WARNED = "e7m0-adamw-s0"
RULES = {
    "rules-attn-s0": ("attn_e4m3", [{"pattern": "attn", "weight": "E4M3"}], 3.9),
    "rules-mlp-s0": ("mlp_e5m2", [{"pattern": "mlp", "weight": "E5M2"}], 4.2),
}


@pytest.fixture(scope="module")
def matrix_dir(tmp_path_factory, synth):
    root = tmp_path_factory.mktemp("matrix")
    cells = []
    for name, (fmt, optimizer, seed, loss_start, extra) in CELLS.items():
        records = synth.metric_records(20, loss_start=loss_start, quantized=fmt is not None, **extra)
        warning = 10 if name == WARNED else None
        events = [{"step": 10, "kind": "rank_warning", "message": "stable rank fell"}] if warning else []
        summary = synth.summary_from(records, name, optimizer=optimizer, first_rank_warning_step=warning)
        config = synth.config_for(name, fmt=fmt, optimizer=optimizer, seed=seed)
        synth.write_run(root / name, config, records, events, summary)
        assignment = {"optimizer.name": optimizer, "seed": seed}
        if fmt is not None:
            assignment = {"quant.weight": fmt, **assignment}
        cells.append(
            {
                "name": name,
                "assignment": assignment,
                "baseline": None if fmt else "fp32",
                "status": "completed",
                "error": None,
                "equivalent_to": None,
            }
        )
    cells[-1]["equivalent_to"] = "e1m6-adamw-s1"
    for name, (label, rules, loss_start) in RULES.items():
        records = synth.metric_records(20, loss_start=loss_start)
        config = synth.config_for(name, rules=rules)
        synth.write_run(root / name, config, records, summary=synth.summary_from(records, name))
        cells.append(
            {
                "name": name,
                "assignment": {"quant.rules": label, "optimizer.name": "adamw", "seed": 0},
                "baseline": None,
                "status": "completed",
                "error": None,
                "equivalent_to": None,
            }
        )
    partial = synth.metric_records(6)
    synth.write_run(
        root / "e6m1-adamw-s0", synth.config_for("e6m1-adamw-s0", fmt="E6M1"), partial, tail='{"st'
    )
    cells.append(
        {
            "name": "e6m1-adamw-s0",
            "assignment": {"quant.weight": "E6M1", "optimizer.name": "adamw", "seed": 0},
            "baseline": None,
            "status": "failed",
            "error": "RuntimeError: out of memory",
            "equivalent_to": None,
        }
    )
    cells.append(
        {
            "name": "e2m5-adamw-s0",
            "assignment": {"quant.weight": "E2M5", "optimizer.name": "adamw", "seed": 0},
            "baseline": None,
            "status": "pending",
            "error": None,
            "equivalent_to": None,
        }
    )
    axes = {"quant.weight": ["E4M3", "E5M2"], "optimizer.name": ["adamw", "manifold_adamw"], "seed": [0, 1]}
    (root / "matrix.json").write_text(json.dumps({"cells": cells, "axes": axes}))
    write_matrix_report(root)
    return root


@pytest.fixture(scope="module")
def table(matrix_dir):
    return results_table(load_matrix(matrix_dir).cells)


def test_results_per_cell_and_gap_to_fp32(table, matrix_dir, synth):
    rows = table.set_index("cell")
    assert rows.loc["e4m3-adamw-s0", "final_val_loss"] == pytest.approx(3.1)
    assert rows.loc["e4m3-adamw-s0", "gap_to_fp32"] == pytest.approx(3.1 - 2.9)  # paired: fp32-s0
    assert rows.loc["e4m3-adamw-s1", "gap_to_fp32"] == pytest.approx(3.11 - 2.92)  # paired: fp32-s1
    assert rows.loc["e4m3-adamw-s0", "min_stable_rank"] == pytest.approx(6.0)
    assert rows.loc["fp32-s0", "format"] == "fp32" and rows.loc["e5m2-adamw-s1", "format"] == "E5M2"
    assert math.isnan(rows.loc["e2m5-adamw-s0", "final_val_loss"])
    assert rows.loc["e6m1-adamw-s0", "status"] == "failed"
    markdown = (matrix_dir / "report.md").read_text()
    shown = synth.markdown_table(markdown, "cell").set_index("cell")
    assert float(shown.loc["e4m3-adamw-s0", "final_val_loss"]) == pytest.approx(3.1)
    assert float(shown.loc["e4m3-adamw-s0", "gap_to_fp32"]) == pytest.approx(0.2)
    assert shown.loc["e2m5-adamw-s0", "final_val_loss"] == "—"
    assert shown.loc["e2m5-adamw-s0", "collapse_step"] == "—"
    assert shown.loc["e4m3-adamw-s0", "collapse_step"] == "none"
    assert shown.loc[WARNED, "first_rank_warning_step"] == "10"


def test_aggregated_over_seeds(table, matrix_dir, synth):
    seeds = aggregate_over_seeds(table).set_index("group")
    group = seeds.loc["quant.weight=E4M3, optimizer.name=adamw"]
    assert group["seeds"] == 2
    assert group["final_val_loss_mean"] == pytest.approx(3.105)
    assert group["final_val_loss_std"] == pytest.approx(0.01 / math.sqrt(2))
    single = seeds.loc["quant.weight=E7M0, optimizer.name=adamw"]
    assert single["seeds"] == 1 and math.isnan(single["final_val_loss_std"])
    assert seeds.loc["baseline=fp32, optimizer.name=adamw", "final_val_loss_mean"] == pytest.approx(2.91)
    shown = synth.markdown_table((matrix_dir / "report.md").read_text(), "group").set_index("group")
    assert shown.loc["quant.weight=E4M3, optimizer.name=adamw", "final_val_loss"] == "3.105 ± 0.007071"
    assert shown.loc["quant.weight=E7M0, optimizer.name=adamw", "final_val_loss"] == "3.6"


def test_failure_classification(matrix_dir, synth):
    findings = failure_table(load_matrix(matrix_dir).cells).set_index("cell")
    assert findings.loc["e5m2-adamw-s0", "failure"] == GRADIENT
    assert findings.loc["e5m2-adamw-s0", "step"] == 8
    assert findings.loc["e5m2-adamw-s0", "layers first"].split(", ")[0] == synth.LAYERS[0]
    # E7M0 stalls 99% with an fp32 master (grid coarseness); its forward costs 0.05 nats from step 10
    assert findings.loc["e7m0-adamw-s0", "failure"] == FORWARD
    assert findings.loc["e7m0-adamw-s0", "step"] == 10
    # an activation underflow of 20% that costs nothing at eval is not a failure
    assert findings.loc["e3m4-adamw-s0", "failure"] == NONE
    assert findings.loc["e4m3-adamw-s0", "failure"] == NONE
    assert findings.loc["e4m3-adamw-s0", "step"] == "none"
    markdown = (matrix_dir / "report.md").read_text()
    assert thresholds_text() in markdown
    assert "E5M2 / adamw: gradient fidelity in 2 of 2 run(s), earliest at step 8" in markdown


def test_manifold_vs_standard_verdicts_paired_by_seed(table, matrix_dir, synth):
    comparison = optimizer_comparison(table)
    loss = comparison[comparison["metric"] == "final_val_loss"].set_index("format")
    # E4M3: paired differences -0.5, -0.5: zero spread, the interval is the point -0.5
    assert loss.loc["E4M3", "diff"] == pytest.approx(-0.5)
    assert loss.loc["E4M3", "ci_high"] == pytest.approx(-0.5) and loss.loc["E4M3", "verdict"] == "better"
    # E5M2: differences +0.01, -0.02: mean -0.005, sd 0.02121, t(0.975, 1) = 12.706 -> half width 0.1906
    assert loss.loc["E5M2", "diff"] == pytest.approx(-0.005)
    assert loss.loc["E5M2", "ci_low"] == pytest.approx(-0.005 - 12.7062 * 0.0212132 / math.sqrt(2), abs=1e-4)
    assert loss.loc["E5M2", "verdict"] == "cannot tell"
    assert loss.loc["E7M0", "optimizer"] == "grid" and loss.loc["E7M0", "verdict"] == "cannot tell"
    assert loss.loc["E7M0", "n"] == 1 and math.isnan(loss.loc["E7M0", "ci_low"])
    stall = comparison[comparison["metric"] == "mean_stall_ratio"].set_index("format")
    assert stall.loc["E4M3", "verdict"] == "cannot tell"
    assert stall.loc["E7M0", "diff"] == pytest.approx(0.5 - 0.99)
    markdown = (matrix_dir / "report.md").read_text()
    section = markdown[markdown.index("## Grid-aware vs standard optimizers") :]
    shown = synth.markdown_table(section, "format")
    shown = shown[shown["metric"] == "final_val_loss"].set_index("format")
    assert shown.loc["E4M3", "verdict"] == "better" and shown.loc["E5M2", "verdict"] == "cannot tell"
    assert "pooled std" not in markdown


def test_equivalent_cells(matrix_dir, synth):
    markdown = (matrix_dir / "report.md").read_text()
    pairs = synth.markdown_table(markdown[markdown.index("## Equivalent cells") :], "cell").set_index("cell")
    assert pairs.loc["e1m6-adamw-s0", "equivalent to"] == "e0m7-adamw-s0"
    assert "E1M6 vs E0M7 under amax scaling" in pairs.loc["e1m6-adamw-s0", "why"]
    assert pairs.loc["e1m6-adamw-s0", "results"].startswith("coincide")
    assert pairs.loc["e0m7-adamw-s1", "why"] == "marked in matrix.json"
    assert pairs.loc["e0m7-adamw-s1", "results"].startswith("differ")
    assert "same uniform grid" in markdown


@pytest.mark.parametrize(
    ("scaling", "format_shift", "paired"),
    [("per_channel", False, True), ("mx", False, True), ("delayed", True, False)],
)
def test_equivalence_needs_amax_scaling_without_format_shifts(tmp_path, synth, scaling, format_shift, paired):
    for name, fmt in (("a", "E1M6"), ("b", "E0M7")):
        config = synth.config_for(name, fmt=fmt, scaling=scaling)
        config["stability"] = {"format_shift": format_shift}
        synth.write_run(tmp_path / name, config, synth.metric_records(3))
    pairs, notes = find_equivalent_pairs(load_matrix(tmp_path).cells)
    assert [(pair.first.name, pair.second.name) for pair in pairs] == ([("a", "b")] if paired else [])
    assert paired or "not treated as the same grid" in notes[0]


@pytest.mark.parametrize(
    ("formats", "storages", "paired"),
    [
        (("E1M6", "E0M7"), (None, None), True),
        (("E4M3", "float8_e4m3fn"), (None, None), True),
        (("E1M6", "e1m6:bias=3"), (None, None), True),
        (("E4M3", "E3M4"), (None, None), False),
        (("E4M3", "e4m3:bias=8"), (None, None), False),  # no NaN code: another grid
        (("E4M3", "E4M3"), ("E1M6", "E0M7"), False),  # weight storage is at scale 1: nothing absorbs 2^k
    ],
)
def test_equivalent_pairs_are_the_same_grid_in_quant_formats_only(tmp_path, synth, formats, storages, paired):
    for name, fmt, storage in zip(("a", "b"), formats, storages, strict=True):
        config = synth.config_for(name, fmt=fmt, scaling="rowwise", weight_storage=storage)
        synth.write_run(tmp_path / name, config, synth.metric_records(3))
    pairs, notes = find_equivalent_pairs(load_matrix(tmp_path).cells)
    assert [(pair.first.name, pair.second.name) for pair in pairs] == ([("a", "b")] if paired else [])
    assert notes == []
    if paired:
        assert pairs[0].reason == (
            f"quant.activation: {formats[0]} vs {formats[1]}; quant.weight: {formats[0]} vs {formats[1]} "
            "under amax scaling"
        )


def test_rule_sets_sweet_spot(matrix_dir, synth):
    markdown = (matrix_dir / "report.md").read_text()
    assert "Best rule set (adamw): attn_e4m3 with final val loss 3 over 1 seed(s)." in markdown
    rules = synth.markdown_table(markdown, "rule set")
    assert list(rules["rule set"]) == ["attn_e4m3", "mlp_e5m2"]
    assert rules["rules"].iloc[0] == "pattern=attn, weight=E4M3"


def test_failed_and_pending_cells_are_listed(matrix_dir, synth):
    markdown = (matrix_dir / "report.md").read_text()
    section = markdown[markdown.index("## Missing or failed cells") :]
    missing = synth.markdown_table(section, "cell").set_index("cell")
    assert list(missing.index) == ["e6m1-adamw-s0", "e2m5-adamw-s0"]
    assert missing.loc["e6m1-adamw-s0", "error"] == "RuntimeError: out of memory"
    assert missing.loc["e2m5-adamw-s0", "run folder"] == "missing"
    assert missing.loc["e2m5-adamw-s0", "status"] == "pending"


def test_html_is_self_contained_with_every_figure(matrix_dir):
    html = (matrix_dir / "report.html").read_text()
    pngs = sorted(p.name for p in (matrix_dir / "figures").glob("*.png"))
    assert pngs == [
        "flip_rate.png",
        "loss_per_format.png",
        "quant_fractions.png",
        "rank.png",
        "stall_heatmap.png",
    ]
    assert html.count(IMAGE) == len(pngs)
    assert "http://" not in html and "https://" not in html and "<script" not in html


def test_without_matrix_json_cells_come_from_configs(tmp_path, synth):
    for name, fmt, optimizer, seed in (
        ("a", "E4M3", "adamw", 0),
        ("b", "E4M3", "adamw", 1),
        ("c", "E5M2", "adamw", 0),
        ("base", None, "adamw", 0),
    ):
        records = synth.metric_records(10, quantized=fmt is not None)
        config = synth.config_for(name, fmt=fmt, optimizer=optimizer, seed=seed)
        synth.write_run(tmp_path / "runs" / name, config, records, summary=synth.summary_from(records, name))
    html = write_report(tmp_path)
    assert html == tmp_path / "report.html"
    rows = results_table(load_matrix(tmp_path).cells).set_index("cell")
    assert rows.loc["base", "baseline"] == "fp32"
    assert rows.loc["a", "group"] == rows.loc["b", "group"] != rows.loc["c", "group"]
    assert rows.loc["c", "format"] == "E5M2" and rows.loc["base", "format"] == "fp32"
    assert rows.loc["a", "group"] == "quant.activation=E4M3, quant.weight=E4M3"
    assert "no matrix.json" in (tmp_path / "report.md").read_text()


def test_write_report_dispatch(tmp_path, synth):
    run = synth.write_run(tmp_path / "one", synth.config_for("one"), synth.metric_records(5))
    assert write_report(run) == run / "report.html"
    assert "Run report: one" in (run / "report.md").read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        write_report(tmp_path / "empty")
    (tmp_path / "empty" / "matrix.json").write_text('{"cells": [{"status": "completed"}]}')
    with pytest.raises(ValueError, match="matrix.json: expected"):
        write_report(tmp_path / "empty")
