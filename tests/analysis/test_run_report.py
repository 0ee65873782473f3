"""The per-run report: the right numbers in the summary table, plots only for recorded data,
self-contained HTML, crashed runs reported from what they logged."""

from __future__ import annotations

import re

import pytest

from altgrad.analysis.run_report import summary_table, write_run_report
from altgrad.analysis.runs import load_run

IMAGE = "data:image/png;base64,"


def _events():
    return [
        {"step": 0, "kind": "start", "message": "started step 0 on cpu"},
        {
            "step": 10,
            "kind": "rank_warning",
            "message": "stable rank fell",
            "layer": "h.0",
            "metric": "stable",
        },
        {"step": 20, "kind": "end", "message": "completed at step 20"},
    ]


def test_full_run_report(tmp_path, synth):
    records = synth.metric_records(20, weight_overflow=0.01, grad_underflow=0.02)
    summary = synth.summary_from(records, "e4m3", first_rank_warning_step=10, total_flips=400)
    path = synth.write_run(tmp_path / "e4m3", synth.config_for("e4m3"), records, _events(), summary)
    html_path = write_run_report(path)
    assert html_path == path / "report.html"
    html = html_path.read_text()
    markdown = (path / "report.md").read_text()
    pngs = sorted(p.name for p in (path / "figures").glob("*.png"))
    assert pngs == ["flip_rate.png", "loss.png", "quant_fractions.png", "rank.png", "stall_ratio.png"]
    assert html.count(IMAGE) == len(pngs)
    assert all(f"figures/{name}" in markdown for name in pngs)
    assert not re.search(r"(src|href)=\"(http|//)", html) and "<script" not in html and "<link" not in html

    table = synth.markdown_table(markdown, "figure").set_index("figure")
    assert float(table.loc["final_train_loss", "value"]) == pytest.approx(3.0)
    assert float(table.loc["best_val_loss", "value"]) == pytest.approx(3.1)
    assert float(table.loc["min_stable_rank", "value"]) == pytest.approx(6.0)
    assert table.loc["total_flips", "value"] == "400"
    assert table.loc["first_rank_warning_step", "value"] == "10"
    assert table.loc["collapse_step", "value"] == "none"
    assert table.loc["total_flips", "source"] == "summary.json"
    assert "not recorded in this run" not in markdown

    header = synth.markdown_table(markdown, "field").set_index("field")["value"]
    assert (
        header["status"] == "completed" and header["optimizer"] == "adamw" and header["precision"] == "fp32"
    )
    events = synth.markdown_table(markdown, "step")
    assert list(events["kind"]) == ["start", "rank_warning", "end"]


def test_absent_families_are_said_not_drawn(tmp_path, synth):
    records = [{"step": s, "train_loss": 4.0 - 0.1 * s} for s in range(1, 6)]
    path = synth.write_run(tmp_path / "bare", None, records)
    markdown_html = write_run_report(path).read_text()
    markdown = (path / "report.md").read_text()
    assert markdown_html.count(IMAGE) == 1
    for family in (
        "Stall ratio",
        "Flip rate",
        "Rank trajectories",
        "Overflow / underflow fractions",
        "Events",
    ):
        assert f"{family}: not recorded in this run" in markdown


def test_crashed_run_is_reported_from_its_logs(tmp_path, synth):
    records = synth.metric_records(12)
    path = synth.write_run(
        tmp_path / "crashed", synth.config_for("crashed"), records, tail='{"step": 13, "tr'
    )
    write_run_report(path)
    markdown = (path / "report.md").read_text()
    assert "incomplete" in markdown
    assert "metrics.jsonl: last line is not valid JSON" in markdown
    table = synth.markdown_table(markdown, "figure").set_index("figure")
    assert float(table.loc["final_train_loss", "value"]) == pytest.approx(4.0 - 0.05 * 12)
    assert table.loc["final_train_loss", "source"] == "metrics.jsonl"
    assert table.loc["total_flips", "value"] == str(12 * 20)


def test_summary_table_marks_sources(tmp_path, synth):
    records = synth.metric_records(10)
    summary = synth.summary_from(records, "r", min_effective_rank=None)
    run = load_run(synth.write_run(tmp_path / "r", synth.config_for("r"), records, summary=summary))
    table = summary_table(run).set_index("figure")
    assert table.loc["min_effective_rank", "source"] == "metrics.jsonl"
    assert table.loc["best_train_loss", "source"] == "metrics.jsonl"
    assert table.loc["final_val_loss", "source"] == "summary.json"
    assert table.loc["first_rank_warning_step", "value"] == "none"
    assert table.loc["first_rank_warning_step", "source"] == "summary.json"
