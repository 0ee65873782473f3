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
    assert err.count("\n") == 1 and "small: factory=None, hf_config=None, n_embd=64, n_layer=2" in err
    assert "large: factory=None, hf_config=None, n_embd=64, n_layer=4" in err
    assert not (tmp_path / "report.html").exists()
    refuse_mixed_models(tmp_path, [small, run_of(synth, tmp_path / "twin", 2)])  # one model: no error


def test_a_run_written_before_model_source_existed_is_the_same_model(tmp_path, synth):
    """Keys added to ``model`` later (source, hf_config, factory) take the value old runs had."""
    old = run_of(synth, tmp_path / "old", 2)
    new = synth.config_for("new") | {
        "model": {"n_layer": 2, "n_embd": 64, "source": "altgrad", "hf_config": None, "factory": None}
    }
    records = synth.metric_records(5)
    newer = synth.write_run(tmp_path / "new", new, records, summary=synth.summary_from(records, "new"))
    refuse_mixed_models(tmp_path, [old, newer])  # one model: no error
    hf = synth.config_for("hf") | {"model": {"n_layer": 2, "n_embd": 64, "source": "hf"}}
    other = synth.write_run(tmp_path / "hf", hf, records, summary=synth.summary_from(records, "hf"))
    with pytest.raises(ValueError, match="runs of 2 different models"):
        refuse_mixed_models(tmp_path, [old, other])


def test_the_refusal_lists_at_most_three_models_and_three_names_each(tmp_path, synth):
    runs = [run_of(synth, tmp_path / f"r{i}", n_layer) for i, n_layer in enumerate([1, 1, 1, 1, 2, 3, 4, 5])]
    with pytest.raises(ValueError) as error:
        refuse_mixed_models(tmp_path, runs)
    message = str(error.value)
    assert "runs of 5 different models" in message and "(+1 more)" in message and "and 2 more" in message
