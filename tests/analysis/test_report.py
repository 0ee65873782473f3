"""``write_report`` on a folder of loose runs refuses runs of different models (one line, exit 2)."""

import pytest

from altgrad.analysis.report import refuse_mixed_models, write_report
from altgrad.cli import main


def run_of(synth, path, n_layer):
    config = synth.config_for(path.name) | {"model": {"n_layer": n_layer, "n_embd": 64}}
    records = synth.metric_records(5)
    return synth.write_run(path, config, records, summary=synth.summary_from(records, path.name))


def test_runs_of_different_models_are_refused_with_one_line(tmp_path, synth, capsys):
    small = run_of(synth, tmp_path / "small", 2)
    run_of(synth, tmp_path / "large", 4)
    with pytest.raises(ValueError, match="runs of 2 different models cannot share one report"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "small: n_embd=64, n_layer=2" in err
    assert "large: n_embd=64, n_layer=4" in err
    assert not (tmp_path / "report.html").exists()
    refuse_mixed_models(tmp_path, [small, run_of(synth, tmp_path / "twin", 2)])  # one model: no error
