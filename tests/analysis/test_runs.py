"""Reading run folders: metrics by step, events, summary, cut-short JSONL, resumed runs, discovery."""

from __future__ import annotations

import math

import pytest

from altgrad.analysis.runs import INCOMPLETE, find_runs, load_run
from altgrad.analysis.summaries import summarize_run


def test_load_run_reads_every_file(tmp_path, synth):
    records = synth.metric_records(20)
    events = [
        {"step": 0, "kind": "start", "message": "started"},
        {"step": 15, "kind": "rank_warning", "message": "rank drop", "layer": "h.0", "metric": "stable"},
    ]
    synth.write_run(tmp_path / "r", synth.config_for("r"), records, events, synth.summary_from(records, "r"))
    run = load_run(tmp_path / "r")
    assert run.name == "r" and run.status == "completed" and run.notes == []
    assert run.config["quant"]["weight"] == "E4M3"
    assert list(run.metrics["step"]) == list(range(1, 21))
    assert run.series("train_loss").loc[20] == pytest.approx(4.0 - 0.05 * 20)
    assert list(run.series("val_loss").index) == [5, 10, 15, 20]
    assert list(run.events["kind"]) == ["start", "rank_warning"]
    assert run.events_of("rank_warning")["layer"].iloc[0] == "h.0"


def test_truncated_last_line_is_skipped_with_a_note(tmp_path, synth):
    records = synth.metric_records(10)
    synth.write_run(
        tmp_path / "r", synth.config_for("r"), records, tail='{"step": 11, "train_loss": 3.4, "fl'
    )
    run = load_run(tmp_path / "r")
    assert run.metrics["step"].max() == 10
    assert any("metrics.jsonl: last line" in note for note in run.notes)
    assert run.status == INCOMPLETE and run.summary == {}


def test_cut_line_in_the_middle_then_resumed(tmp_path, synth):
    """A crash mid-write, then a resume that logs steps 9..10 again: the later records win."""
    first, again = synth.metric_records(10), synth.metric_records(10, loss_start=5.0)[8:]
    path = synth.write_run(tmp_path / "r", synth.config_for("r"), first, tail='{"step": 11, "trai\n')
    with open(path / "metrics.jsonl", "a") as file:
        file.writelines(f'{{"step": {r["step"]}, "train_loss": {r["train_loss"]}}}\n' for r in again)
    run = load_run(path)
    assert run.series("train_loss").loc[9] == pytest.approx(5.0 - 0.05 * 9)
    assert run.series("stall_ratio/mean").loc[9] == pytest.approx(0.5)  # kept from the first record
    assert any("line 11" in note for note in run.notes)


def test_nonfinite_strings_read_as_floats(tmp_path, synth):
    records = synth.metric_records(3)
    records[-1]["train_loss"] = math.nan
    synth.write_run(tmp_path / "r", synth.config_for("r"), records)
    run = load_run(tmp_path / "r")
    assert math.isnan(run.metrics["train_loss"].iloc[-1])
    assert list(run.series("train_loss").index) == [1, 2]


def test_summary_figures_fall_back_to_the_logs(tmp_path, synth):
    records = synth.metric_records(20)
    events = [
        {"step": 12, "kind": "rank_warning", "message": "w"},
        {"step": 18, "kind": "nan_stop", "message": "non-finite loss", "layers": ["h.0"]},
    ]
    synth.write_run(tmp_path / "r", synth.config_for("r"), records, events)
    figures = summarize_run(load_run(tmp_path / "r"))
    assert figures["final_train_loss"] == pytest.approx(3.0)
    assert figures["best_train_loss"] == pytest.approx(3.0)
    assert figures["final_val_loss"] == pytest.approx(3.1)
    assert figures["best_val_loss"] == pytest.approx(3.1)
    assert figures["total_flips"] == 20 * 20
    assert figures["mean_stall_ratio"] == pytest.approx(0.5)
    assert figures["min_stable_rank"] == pytest.approx(6.0)
    assert figures["min_effective_rank"] == pytest.approx(14.0)
    assert figures["first_rank_warning_step"] == 12
    assert (figures["collapse_step"], figures["collapse_reason"]) == (18, "non-finite loss")


def test_total_flips_not_summed_when_steps_were_skipped(tmp_path, synth):
    records = synth.metric_records(20)[1::2]
    synth.write_run(tmp_path / "r", synth.config_for("r"), records)
    assert math.isnan(summarize_run(load_run(tmp_path / "r"))["total_flips"])


def test_summary_json_wins_over_the_logs(tmp_path, synth):
    records = synth.metric_records(20)
    synth.write_run(
        tmp_path / "r",
        synth.config_for("r"),
        records,
        summary=synth.summary_from(records, "r", total_flips=123),
    )
    assert summarize_run(load_run(tmp_path / "r"))["total_flips"] == 123


def test_find_runs_recursive_sorted_and_skips_checkpoints(tmp_path, synth):
    for name in ("b", "a/x", "a/y"):
        synth.write_run(tmp_path / name, synth.config_for(name), synth.metric_records(2))
    (tmp_path / "a/x/checkpoints/inner").mkdir(parents=True)
    (tmp_path / "a/x/checkpoints/inner/config.yaml").write_text("{}")
    (tmp_path / "empty").mkdir()
    assert find_runs(tmp_path) == [tmp_path / "a/x", tmp_path / "a/y", tmp_path / "b"]
    assert find_runs(tmp_path / "b") == [tmp_path / "b"]


def test_missing_folders_raise(tmp_path, synth):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        find_runs(tmp_path / "nope")


@pytest.mark.parametrize(
    ("storage", "master"),
    [(None, True), ("none", True), ("FP32", True), (" none ", True), ("", True),
     ("quantized", False), ("E4M3", False), ("e5m2", False), (3, False)],
)  # fmt: skip
def test_weight_storage_keeps_a_master_copy_for_every_spelling_of_no_format(storage, master):
    from altgrad.analysis.matrix import keeps_master_copy
    from altgrad.quantization.formats import parse_format

    assert keeps_master_copy(storage) is master
    if isinstance(storage, str) and storage != "quantized":
        assert (parse_format(storage) is None) is master  # the same spellings as the one parser


def test_reading_runs_imports_no_torch():
    """Analysis reads run folders; the format numerics it consults (equivalent grids) load on first use."""
    import subprocess
    import sys

    code = "import sys, altgrad.analysis; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
