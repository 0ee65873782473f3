"""Run provenance: versions in summary.json, ``altgrad --version``, ``altgrad train --print-config``."""

import json
import platform
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import altgrad
from altgrad.cli import main
from altgrad.training.config import load_config
from altgrad.training.trainer import train
from altgrad.versions import SOURCE_DIR, run_versions


def test_run_versions_name_this_process_and_the_source_checkout():
    versions = run_versions()
    assert versions["altgrad"] == altgrad.__version__
    assert versions["torch"] == torch.__version__ and versions["python"] == platform.python_version()
    head = subprocess.run(["git", "-C", str(SOURCE_DIR), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert versions["git_commit"] == head.stdout.strip() and isinstance(versions["git_dirty"], bool)
    else:
        assert versions["git_commit"] is None


def test_version_flag_prints_the_versions(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(
        f"altgrad {altgrad.__version__} (torch {torch.__version__}"
    )


def test_print_config_prints_the_resolved_yaml_and_trains_nothing(tmp_path, capsys):
    args = [
        "train",
        "--print-config",
        "--set",
        "quant.recipe=torchao_rowwise",
        "--set",
        f"out_dir={tmp_path}",
    ]
    assert main(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config(None, ["quant.recipe=torchao_rowwise", f"out_dir={tmp_path}"]).to_dict()
    assert printed["quant"]["scaling"] == "rowwise" and printed["quant"]["grad"] == "E4M3"
    assert not any(Path(tmp_path).iterdir())
    assert main(["train", "--print-config", "--resume", str(tmp_path)]) == 2


def test_summary_records_the_versions(tmp_path):
    overrides = [
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=16",
        "train.batch_size=2",
        "train.max_steps=1",
        "train.eval_batches=1",
        "logging.progress=false",
        f"out_dir={tmp_path}",
    ]
    config = load_config(None, overrides)
    train(config)
    summary = json.loads((config.run_dir / "summary.json").read_text())
    assert summary["versions"] == run_versions()
