"""Logging on clusters: W&B group/tags/config and a run id resumed from the run folder (through a
fake ``wandb`` module, no network), TensorBoard purging replayed steps, plain progress lines."""

import io
import re
import sys
import types

import pytest

from altgrad.training.config import load_config
from altgrad.training.loggers import WANDB_ID_FILE, StepProgress
from altgrad.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=8", "train.batch_size=2",
    "train.max_steps=6", "train.warmup_steps=1", "train.eval_interval=6", "train.eval_batches=1",
    "checkpoint.interval=3", "checkpoint.keep=2", "logging.progress=false",
]  # fmt: skip


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in ``wandb``: ``inits`` holds every ``wandb.init`` call's keyword arguments."""
    inits, logged = [], []

    class FakeRun:
        def log(self, values, step):
            logged.append(step)

        def finish(self):
            pass

    def init(**kwargs):
        inits.append(kwargs)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    return types.SimpleNamespace(inits=inits, logged=logged)


def crash_after_step_6(run_dir):
    """As if killed after step 6 was logged but before its checkpoint: the resume starts at step 3."""
    (run_dir / "summary.json").unlink()
    (run_dir / "checkpoints" / "step_6.pt").unlink()


def test_wandb_run_is_grouped_tagged_and_resumed_under_its_stored_id(tmp_path, fake_wandb):
    tags = "logging.wandb_tags=[quant.weight=E4M3, seed=0]"
    wandb = ["logging.wandb=offline", "logging.wandb_group=m", tags]
    config = load_config(None, [*TINY, f"out_dir={tmp_path}", "name=cell", *wandb])
    train(config)
    first = fake_wandb.inits[0]
    stored = (config.run_dir / WANDB_ID_FILE).read_text().strip()
    assert first["id"] == stored and re.fullmatch(r"[0-9a-f]{12}", stored)
    assert (first["group"], first["tags"], first["resume"]) == ("m", ["quant.weight=E4M3", "seed=0"], "allow")
    assert first["config"]["quant"]["weight"] == config.quant.weight and first["name"] == "cell"

    crash_after_step_6(config.run_dir)
    train(config, resume=True)
    assert fake_wandb.inits[1]["id"] == stored and fake_wandb.inits[1]["resume"] == "allow"
    assert fake_wandb.logged == [1, 2, 3, 4, 5, 6, 4, 5, 6]  # W&B itself drops the steps it holds

    train(config, overwrite=True)  # a new run under the same name is a new W&B run
    assert fake_wandb.inits[2]["id"] != stored
    assert (config.run_dir / WANDB_ID_FILE).read_text().strip() == fake_wandb.inits[2]["id"]


def test_tensorboard_purges_the_steps_a_resume_replays(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config(None, [*TINY, f"out_dir={tmp_path}", "name=tb", "logging.tensorboard=true"])
    train(config)
    crash_after_step_6(config.run_dir)
    train(config, resume=True)
    events = EventAccumulator(str(config.run_dir / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train_loss")] == [1, 2, 3, 4, 5, 6]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_plain_lines_every_interval_off_a_terminal_and_a_bar_on_one():
    record = {"train_loss": 2.91234, "tokens_per_s": 5120.4, "stall_ratio/mean": 0.9124}
    log = io.StringIO()
    progress = StepProgress("run", total=5, initial=0, enabled=True, interval=2, stream=log)
    for step in range(1, 6):
        progress.show(step, record)
    progress.close()
    assert log.getvalue().splitlines() == [
        f"run step {step}/5 loss 2.9123 tok/s 5120 stall 0.912" for step in (2, 4, 5)
    ]

    terminal = Terminal()
    progress = StepProgress("run", total=5, initial=0, enabled=True, interval=2, stream=terminal)
    progress.show(3, {"train_loss": 1.0, "tokens_per_s": 1.0})
    progress.close()
    assert "3/5" in terminal.getvalue() and "run step" not in terminal.getvalue()  # a tqdm bar

    quiet = io.StringIO()
    StepProgress("run", total=5, initial=0, enabled=False, interval=1, stream=quiet).show(1, record)
    assert quiet.getvalue() == ""


def test_a_run_logging_to_a_file_prints_a_line_every_log_interval(tmp_path, capsys):
    overrides = [*TINY, f"out_dir={tmp_path}", "name=plain", "logging.progress=true", "train.log_interval=4"]
    train(load_config(None, overrides))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("plain step")]
    assert [line.split()[2] for line in lines] == ["4/6", "6/6"]
