"""Best-lr selection, paired comparisons, the answer section and the CSVs on a 3-seed synthetic matrix
whose every figure is computed by hand below (final val loss = loss_start - 0.9 in ``metric_records``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from altgrad.analysis.comparisons import lr_sweep, optimizer_comparison
from altgrad.analysis.failure import classify_failure
from altgrad.analysis.matrix import Cell, load_matrix
from altgrad.analysis.matrix_report import at_chosen_lr_cells, write_matrix_report
from altgrad.analysis.results import results_table
from altgrad.analysis.runs import load_run

T_975_2 = 4.302653  # Student's t, 0.975 quantile, 2 degrees of freedom (published tables)
STORAGES = {
    "master": {"weight_storage": "none"},
    "stochastic": {"weight_storage": "quantized", "storage_rounding": "stochastic"},
}
# (format, storage, optimizer, lr) -> final val loss of seeds 0, 1, 2; fp32 baseline under None
VAL = {
    None: (2.90, 2.92, 2.91),
    ("E4M3", "master", "adamw", 1e-3): (3.20, 3.22, 3.21),
    ("E4M3", "master", "adamw", 3e-3): (3.00, 3.03, 3.02),
    ("E4M3", "master", "manifold_adamw", 0.5): (2.98, 3.00, 3.01),
    ("E4M3", "master", "manifold_adamw", 1.0): (3.10, 3.10, 3.10),
    ("E4M3", "stochastic", "adamw", 3e-3): (3.10, 3.12, 3.13),
    ("E4M3", "stochastic", "manifold_adamw", 0.5): (3.00, 3.01, 3.02),
    ("E7M0", "master", "adamw", 3e-3): (3.60, 3.62, 3.61),
    ("E7M0", "master", "grid", 1.0): (3.40, 3.45, 3.41),
}


def _half_width(differences):
    return T_975_2 * np.std(differences, ddof=1) / math.sqrt(len(differences))


@pytest.fixture(scope="module")
def matrix_dir(tmp_path_factory, synth):
    root = tmp_path_factory.mktemp("answer")
    cells = []
    for key, losses in VAL.items():
        for seed, val in enumerate(losses):
            if key is None:
                name, assignment, fmt, optimizer = f"fp32-s{seed}", {"seed": seed}, None, "adamw"
            else:
                fmt, storage, optimizer, lr = key
                name = f"{fmt}-{optimizer}-lr{lr:g}-{storage}-s{seed}"
                assignment = {
                    "quant.weight": fmt, "optimizer.name": optimizer, "optimizer.lr": lr,
                    "optimizer": storage, "seed": seed,
                }  # fmt: skip
            stall = 0.99 if fmt == "E7M0" and optimizer == "adamw" else 0.5
            records = synth.metric_records(20, loss_start=val + 0.9, quantized=fmt is not None, stall=stall)
            config = synth.config_for(name, fmt=fmt, optimizer=optimizer, seed=seed)
            if key is not None:
                config["optimizer"].update(lr=lr, **STORAGES[storage])
            synth.write_run(root / name, config, records, summary=synth.summary_from(records, name))
            cells.append({"name": name, "assignment": assignment, "baseline": None if fmt else "fp32",
                          "status": "completed"})  # fmt: skip
    (root / "matrix.json").write_text(json.dumps({"cells": cells, "axes": {}}))
    write_matrix_report(root)
    return root


@pytest.fixture(scope="module")
def table(matrix_dir):
    return results_table(load_matrix(matrix_dir).cells)


def test_storage_and_lr_come_from_the_run_config(table):
    rows = table.set_index("cell")
    assert rows.loc["E4M3-adamw-lr0.003-master-s0", "storage"] == "fp32 master"
    assert rows.loc["E4M3-adamw-lr0.003-stochastic-s0", "storage"] == "quantized stochastic"
    assert rows.loc["E4M3-manifold_adamw-lr0.5-master-s1", "lr"] == 0.5
    labels = {
        "fp32": "fp32 master",
        "E4M3": "E4M3 nearest",
        "bfloat16": "bfloat16 nearest",
    }
    for storage, label in labels.items():
        cell = Cell("c", {}, base={"optimizer": {"name": "adamw", "weight_storage": storage}})
        assert cell.storage == label
    kahan = {"optimizer": {"weight_storage": "quantized", "storage_rounding": "nearest", "kahan": True}}
    assert Cell("c", {}, base=kahan).storage == "quantized nearest + kahan"
    grid = Cell("c", {}, base={"optimizer": {"name": "grid"}, "train": {"lr": 0.003}})
    assert grid.lr == 1.0 and grid.storage == "on grid (grid optimizer)"
    assert Cell("c", {}, base={"optimizer": {"name": "adamw"}, "train": {"lr": 0.003}}).lr == 0.003


def test_lr_chosen_per_setting_and_optimizer_on_the_mean_over_seeds(table, matrix_dir, synth):
    sweep = lr_sweep(table)
    chosen = sweep[sweep["chosen"]].set_index(["format", "storage", "optimizer"])["lr"]
    assert chosen[("E4M3", "fp32 master", "adamw")] == 3e-3  # mean 3.0167 < 3.21
    assert chosen[("E4M3", "fp32 master", "manifold_adamw")] == 0.5  # mean 2.9967 < 3.10
    assert len(chosen) == 6
    means = sweep.set_index(["format", "storage", "optimizer", "lr"])["val_loss_mean"]
    assert means[("E4M3", "fp32 master", "adamw", 1e-3)] == pytest.approx(3.21)
    markdown = (matrix_dir / "report.md").read_text()
    section = markdown[markdown.index("## Learning-rate sweeps") :]
    assert "chosen on the same seeds" in section
    assert "E4M3 / fp32 master / adamw: lr 0.003 (mean final val loss 3.017 over 3 seed(s))" in section
    shown = synth.markdown_table(section, "format")
    assert len(shown) == 4 and list(shown["chosen"]) == ["False", "True", "True", "False"]
    assert (matrix_dir / "figures" / "lr_sweep.png").is_file()


def test_optimizers_compared_at_their_chosen_lr_paired_by_seed(table):
    loss = optimizer_comparison(table)
    loss = loss[loss["metric"] == "final_val_loss"].set_index(["format", "storage"])
    master = loss.loc[("E4M3", "fp32 master")]
    assert (master["lr"], master["reference_lr"]) == (0.5, 3e-3)
    differences = np.array([2.98, 3.00, 3.01]) - np.array([3.00, 3.03, 3.02])
    assert master["diff"] == pytest.approx(differences.mean())
    assert master["ci_low"] == pytest.approx(differences.mean() - _half_width(differences), abs=1e-6)
    assert master["ci_high"] == pytest.approx(differences.mean() + _half_width(differences), abs=1e-6)
    assert master["verdict"] == "cannot tell"  # [-0.0448, +0.0048] contains 0
    assert loss.loc[("E4M3", "quantized stochastic"), "verdict"] == "better"
    assert loss.loc[("E7M0", "fp32 master"), "verdict"] == "better"  # setting: grid's storage is its own


def test_the_answer_opens_the_report(matrix_dir, synth, table):
    markdown = (matrix_dir / "report.md").read_text()
    assert markdown.index("## The answer") < markdown.index("## Results per cell")
    answer = synth.markdown_table(markdown, "format").set_index("format")
    gaps = np.array([3.00, 3.03, 3.02]) - np.array([2.90, 2.92, 2.91])
    low, high = gaps.mean() - _half_width(gaps), gaps.mean() + _half_width(gaps)
    assert answer.loc["E4M3", "gap to fp32, standard"] == (
        f"{gaps.mean():+.3g} [{low:+.3g}, {high:+.3g}] worse (adamw, fp32 master)"
    )
    assert answer.loc["E4M3", "best optimizer / storage (lr)"] == "manifold_adamw / fp32 master (0.5)"
    best = np.array([2.98, 3.00, 3.01]) - np.array([2.90, 2.92, 2.91])
    assert answer.loc["E4M3", "best: gap to fp32"].startswith(f"{best.mean():+.3g} [")
    assert answer.loc["E4M3", "grid-aware verdicts"] == "1 better, 0 worse, 1 cannot tell"
    assert answer.loc["E4M3", "grid-aware vs standard (best case)"].startswith(
        "manifold_adamw vs adamw on quantized stochastic: -0.107 ["
    )
    runs = table.set_index("cell")["run"]
    e7m0, fp32 = load_run(runs["E7M0-adamw-lr0.003-master-s0"]), load_run(runs["fp32-s0"])
    # the same finding as the report's failure table: judged against the fp32 run of the same seed
    assert answer.loc["E7M0", "cause (failure attribution)"] == classify_failure(e7m0, baseline=fp32).mode
    assert "Grid-aware better than the standard optimizer (95% interval below 0) in 2 of 3" in markdown
    assert "Largest confirmed gain (upper bound of the interval furthest below 0): E7M0 with grid" in markdown


def test_csvs_let_anyone_recompute_every_interval(matrix_dir):
    by_cell = pd.read_csv(matrix_dir / "results.csv")
    by_seed = pd.read_csv(matrix_dir / "results_by_seed.csv")
    required = ["cell", "format", "optimizer", "storage", "lr", "n_seeds", "val_loss_mean",
                "gap_to_fp32_mean", "gap_ci_low", "gap_ci_high", "failure_mode"]  # fmt: skip
    assert set(required) <= set(by_cell.columns) and {"seed", "val_loss"} <= set(by_seed.columns)
    assert len(by_seed) == 3 * len(VAL) and len(by_cell) == len(VAL)
    quantized = by_cell[by_cell["baseline"].isna()]
    for _, row in quantized.iterrows():
        gaps = by_seed.loc[by_seed["cell"] == row["cell"], "gap_to_fp32"].to_numpy()
        assert len(gaps) == row["n_seeds"] == 3
        assert row["gap_to_fp32_mean"] == pytest.approx(gaps.mean())
        assert row["gap_ci_low"] == pytest.approx(gaps.mean() - _half_width(gaps), abs=1e-6)
        assert row["gap_ci_high"] == pytest.approx(gaps.mean() + _half_width(gaps), abs=1e-6)
    seeds = by_seed.set_index("run")
    assert seeds.loc["E4M3-adamw-lr0.003-master-s1", "val_loss"] == pytest.approx(3.03)
    assert seeds.loc["E4M3-adamw-lr0.003-master-s1", "fp32_val_loss"] == pytest.approx(2.92)
    stochastic = by_cell.set_index("cell").loc[seeds.loc["E4M3-adamw-lr0.003-stochastic-s0", "cell"]]
    assert (stochastic["storage"], stochastic["lr"], stochastic["val_loss_mean"]) == (
        "quantized stochastic",
        3e-3,
        pytest.approx(3.11667, abs=1e-5),
    )


def test_plots_keep_each_optimizer_at_its_chosen_lr_and_labels_leave_the_lr_out(matrix_dir, table):
    cells = load_matrix(matrix_dir).cells
    kept = {cell.name for cell in at_chosen_lr_cells(cells, table)}
    dropped = {cell.name for cell in cells} - kept
    assert dropped == {
        f"E4M3-{name}-master-s{seed}" for name in ("adamw-lr0.001", "manifold_adamw-lr1") for seed in range(3)
    }
    labels = table.set_index("cell")["label"]
    assert labels["E4M3-adamw-lr0.001-master-s0"] == labels["E4M3-adamw-lr0.003-master-s0"] == "E4M3 / master"
    assert "Each optimizer at its chosen lr" in (matrix_dir / "report.md").read_text()


def test_the_standard_gap_quotes_the_reference_optimizer_of_the_comparisons():
    """With sgd listed before adamw, the answer quotes adamw (first of STANDARD_OPTIMIZERS), as the
    grid-aware comparisons do."""
    from altgrad.analysis.answer import answer_table

    def row(optimizer, gap):
        return {
            "format": "E4M3", "optimizer": optimizer, "storage": "fp32 master", "baseline": None,
            "lr": 1e-3, "val_loss_mean": 3.0 + gap, "gap_to_fp32_mean": gap, "gap_ci_low": gap - 0.01,
            "gap_ci_high": gap + 0.01, "gap_n": 3, "gap_verdict": "worse", "failure_mode": "none observed",
        }  # fmt: skip

    by_cell = pd.DataFrame([row("sgd", 0.5), row("adamw", 0.1)])
    answer = answer_table(by_cell, pd.DataFrame()).set_index("format")
    assert answer.loc["E4M3", "gap to fp32, standard"].endswith("(adamw, fp32 master)")
    assert answer.loc["E4M3", "gap to fp32, standard"].startswith("+0.1 [")
