"""The component seam: a registered diagnostic and a user component from the config reach
metrics.jsonl, a user component's state survives --resume bit for bit, bad paths are one-line errors,
and building a Trainer touches neither the disk nor the global RNGs."""

import json

import pytest
import torch

from altgrad.diagnostics import components
from altgrad.diagnostics.components import Component, load_component_class, register_component
from altgrad.training.config import ConfigError, load_config
from altgrad.training.trainer import Trainer, resume, train
from tiny_runs import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    *TINY_MODEL,
    "train.max_steps=8",
    "train.warmup_steps=0",
    "train.eval_interval=4",
    "train.eval_batches=1",
    "train.log_interval=4",
    "diagnostics.rank_interval=4",
    "diagnostics.flip_interval=4",
    "checkpoint.interval=4",
    "logging.progress=false",
]
USER = "diagnostics.callbacks=[diagnostics.toy_components:CountingDraws]"


def tiny_config(tmp_path, *overrides):
    return load_config(None, [*TINY, f"out_dir={tmp_path}", *overrides])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


class WeightNorm(Component):
    """A toy diagnostic: the global weight norm every 3 steps."""

    name = "weight_norm"
    interval = 3

    def measure(self, step):
        if not self.due(step):
            return {}
        weights = torch.cat([p.detach().flatten() for p in self.run.model.parameters()])
        norm = torch.linalg.vector_norm(weights)
        return {"weight_norm": float(norm)}


def test_a_registered_diagnostic_is_built_run_and_logged(tmp_path, monkeypatch):
    monkeypatch.setattr(components, "COMPONENTS", dict(components.COMPONENTS))
    register_component(WeightNorm)  # the one registration line
    config = tiny_config(tmp_path, "name=toy")
    train(config)
    records = read_jsonl(config.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "weight_norm" in r] == [3, 6, 8]  # due every 3 and on the last
    assert [r["step"] for r in records] == [3, 4, 6, 8]  # a due component makes its step a logged one
    with pytest.raises(ValueError, match="taken"):
        register_component(type("Other", (WeightNorm,), {}))


def test_a_user_component_from_the_config_resumes_bit_for_bit(tmp_path, monkeypatch):
    whole = tiny_config(tmp_path, "name=whole", USER)
    train(whole)
    crashing = tiny_config(tmp_path, "name=crash", USER)
    real_step = Trainer._train_step

    def crash_at_step_7(self, step):
        if step == 7:
            raise RuntimeError("simulated crash")
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "_train_step", crash_at_step_7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashing)
    monkeypatch.undo()
    resume(crashing.run_dir)

    def strip(records):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in records]

    uninterrupted = strip(read_jsonl(whole.run_dir / "metrics.jsonl"))
    resumed = strip(read_jsonl(crashing.run_dir / "metrics.jsonl"))
    assert resumed == uninterrupted
    toy = [(r["step"], r["toy/steps_seen"]) for r in uninterrupted if "toy/draw" in r]
    assert toy == [(2, 2), (4, 4), (6, 6), (8, 8)]
    assert len({r["toy/draw"] for r in uninterrupted if "toy/draw" in r}) == 4  # the generator moved on


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("nope:X", "cannot import 'nope'"),
        ("os:nothing", "module 'os' has no 'nothing'"),
        ("os:path", "is not a component"),
        ("diagnostics.toy_components:NotAComponent", "is not a component"),
        ("no_colon", "is not of the form"),
    ],
)
def test_a_bad_component_path_is_a_one_line_config_error(path, message):
    with pytest.raises(ValueError, match=message):
        load_component_class(path)
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"diagnostics.callbacks=[{path}]"])
    text = str(error.value)
    assert text.startswith("config key 'diagnostics.callbacks'") and message in text and "\n" not in text


def test_building_a_trainer_writes_nothing_and_leaves_the_rngs_alone(tmp_path):
    old = tiny_config(tmp_path, "name=old", "train.max_steps=2")
    train(old)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    Trainer(tiny_config(tmp_path, "name=old", "train.max_steps=2"), overwrite=True)
    Trainer(tiny_config(tmp_path, "name=new"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
