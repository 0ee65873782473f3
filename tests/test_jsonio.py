"""Strict JSON: the reference is Python's own parser told to refuse NaN/Infinity literals."""

import json
import math
import os

import numpy as np
import pytest

from altgrad import jsonio
from altgrad.jsonio import dumps_strict, write_json_atomic
from altgrad.training.loggers import MetricsLogger


def strict_loads(text):
    def refuse(literal):
        raise ValueError(f"non-strict JSON literal {literal}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_become_null_at_any_depth():
    value = {
        "nan": math.nan, "inf": math.inf, "ninf": -math.inf, "numpy": np.float64("nan"),
        "nested": {"list": [1.5, math.nan, (math.inf, 2)]}, "finite": 0.1, "int": 3, "text": "nan",
    }  # fmt: skip
    assert strict_loads(dumps_strict(value)) == {
        "nan": None, "inf": None, "ninf": None, "numpy": None,
        "nested": {"list": [1.5, None, [None, 2]]}, "finite": 0.1, "int": 3, "text": "nan",
    }  # fmt: skip
    with pytest.raises(ValueError):
        strict_loads(json.dumps(value))  # the reference parser does refuse what json.dumps writes


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = write_json_atomic(tmp_path / "summary.json", {"steps": 1})
    before = path.read_bytes()

    def disk_full(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(jsonio.os, "replace", disk_full)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, {"steps": 2})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["summary.json"]


def test_metrics_and_events_lines_are_strict_json(tmp_path):
    logger = MetricsLogger.for_run(tmp_path)
    logger.log({"step": 1, "train_loss": math.nan, "grad_norm": math.inf})
    logger.event(1, "nan_stop", "non-finite loss", value=-math.inf)
    logger.close()
    assert strict_loads((tmp_path / "metrics.jsonl").read_text()) == {
        "step": 1, "train_loss": None, "grad_norm": None,
    }  # fmt: skip
    assert strict_loads((tmp_path / "events.jsonl").read_text())["value"] is None
