"""docs/run_folder.md and the trainer agree: every documented metrics key family appears in a tiny
run with every setting on, and every key the run writes is documented."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from altgrad.training.config import load_config
from altgrad.training.trainer import train
from tiny_runs import EVERY_DIAGNOSTIC_DUE as EVERYTHING_ON

DOC = Path(__file__).resolve().parents[2] / "docs" / "run_folder.md"

"""Overrides that turn on every documented key family (a family needing its own setting adds it here)."""

NOT_PRODUCED_YET: set[str] = set()
"""Documented families this branch does not write yet (the lead empties it after merging)."""

PLACEHOLDER = re.compile(r"\\\{(layer|param|kind)\\\}")


def documented_keys() -> list[str]:
    """The backticked keys in the first column of the metrics.jsonl table, e.g. ``flips/{layer}``."""
    section = DOC.read_text().split("## metrics.jsonl", 1)[1].split("\n## ", 1)[0]
    keys = []
    for line in section.splitlines():
        if line.startswith("| `"):
            first_cell = line.split(" | ", 1)[0]
            keys += re.findall(r"`([^`]+)`", first_cell)
    return keys


def key_pattern(key: str) -> re.Pattern[str]:
    """``quant/overflow_frac/{layer}/{kind}`` -> a regex where each placeholder is one path segment."""
    return re.compile(PLACEHOLDER.sub("[^/]+", re.escape(key)) + "$")


@pytest.fixture(scope="module")
def written_keys(tmp_path_factory) -> set[str]:
    out = tmp_path_factory.mktemp("runs")
    config = load_config(None, [*EVERYTHING_ON, f"out_dir={out}", "name=doc"])
    assert train(config)["status"] == "completed"
    lines = (config.run_dir / "metrics.jsonl").read_text().splitlines()
    return {key for line in lines for key in json.loads(line)}


def test_the_doc_lists_the_key_families() -> None:
    keys = documented_keys()
    assert "flips/{layer}" in keys and "val_loss" in keys and len(keys) > 30
    assert key_pattern("quant/overflow_frac/{layer}/{kind}").match("quant/overflow_frac/h.0.mlp/grad")
    assert not key_pattern("flips/{layer}").match("flips/h.0/x")


def test_every_documented_family_is_written(written_keys: set[str]) -> None:
    missing = [
        key
        for key in documented_keys()
        if key not in NOT_PRODUCED_YET and not any(key_pattern(key).match(k) for k in written_keys)
    ]
    assert not missing, f"documented in {DOC.name} but not in a run with every setting on: {missing}"


def test_every_written_key_is_documented(written_keys: set[str]) -> None:
    patterns = [key_pattern(key) for key in documented_keys()]
    undocumented = sorted(k for k in written_keys - {"step"} if not any(p.match(k) for p in patterns))
    assert not undocumented, f"written to metrics.jsonl but not documented in {DOC.name}: {undocumented}"
