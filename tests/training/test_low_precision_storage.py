"""Weights stored in bfloat16 with no fp32 master copy: Zamirai et al. 2020 ("Revisiting BFloat16 Training").

Adding 1e-3 to 1.0 in bfloat16 (spacing 2^-7 ~ 0.0078 in [1, 2), so half a step is 0.0039 > 1e-3)
with round-to-nearest never moves; stochastic rounding (unbiased) and Kahan summation (the lost low
bits carried in an fp32 compensation buffer) recover the fp32 result.
"""

from __future__ import annotations

import json

import pytest
import torch

from altgrad.diagnostics.flips import WeightFlipTracker
from altgrad.quantization.ops import quantize
from altgrad.training.checkpoint import load_checkpoint
from altgrad.training.config import load_config
from altgrad.training.optimizer import OPTIMIZERS, SGD, AdamW
from altgrad.training.trainer import Trainer, resume
from altgrad.training.trainer import train as run_training
from tiny_runs import TINY_MODEL

STEPS, UPDATE, COPIES = 500, 1e-3, 4096
TARGET = 1.0 + STEPS * UPDATE  # 1.5: still in [1, 2), where the bfloat16 spacing is 2^-7
BF16_SPACING = 2.0**-7


pytestmark = pytest.mark.usefixtures("one_thread")


def toy(cls, **storage) -> tuple[torch.Tensor, dict]:
    """COPIES independent weights at 1.0, each receiving an update of +1e-3 per step for STEPS steps.

    SGD: lr 1e-3, gradient -1. AdamW: lr 1e-3 and a constant gradient, so m_hat / sqrt(v_hat) = 1.
    """
    w = torch.nn.Parameter(torch.ones(COPIES))
    extra = {"weight_decay": 0.0} if cls is AdamW else {}
    opt = cls([w], lr=UPDATE, seed=0, **extra, **storage)
    for _ in range(STEPS):
        w.grad = -torch.ones(COPIES)
        opt.step()
    return w.detach(), opt.state[w]


@pytest.mark.parametrize("cls", [SGD, AdamW])
def test_bfloat16_nearest_never_moves(cls):
    w, _ = toy(cls, weight_storage="bfloat16")
    assert torch.all(w == 1.0)


@pytest.mark.parametrize("cls", [SGD, AdamW])
def test_bfloat16_stochastic_rounding_reaches_the_target_on_average(cls):
    w, _ = toy(cls, weight_storage="bfloat16", storage_rounding="stochastic")
    # Each step's rounding error has mean 0 and std 2^-7 * sqrt(p(1-p)) with p = 1e-3 / 2^-7 = 0.128:
    # one weight ends at 1.5 +- 0.058 (sqrt(500) * 0.0026), the mean of 4096 at 1.5 +- 0.0009.
    assert torch.all(w > 1.0)  # every copy moved
    assert abs(w.mean().item() - TARGET) < 0.005  # > 5 sigma
    assert 0.04 < w.std().item() < 0.08
    assert torch.equal(w, w.to(torch.bfloat16).float())  # stored on the bfloat16 grid


@pytest.mark.parametrize("cls", [SGD, AdamW])
def test_bfloat16_kahan_reaches_the_target(cls):
    w, state = toy(cls, weight_storage="bfloat16", kahan=True)
    # The stored weight is within half a bfloat16 step of 1.5; weight + compensation is the fp32 sum
    # (fp32 itself drifts 2.3e-5 from 1.5 over these 500 additions of float32(1e-3)).
    assert torch.all((w - TARGET).abs() <= BF16_SPACING / 2)
    assert torch.all((w + state["kahan_comp"] - TARGET).abs() < 1e-4)
    assert torch.equal(w, w.to(torch.bfloat16).float())


# ---- a short training run ------------------------------------------------------------------------------


def train(storage: dict, steps: int = 100, lr: float = 8e-4) -> tuple[dict[str, float], float, float]:
    """A 16-32-1 tanh MLP on a synthetic teacher, AdamW, weights stored per ``storage``.

    Every weight starts in [0.25, 0.5), where bfloat16's spacing is 2^-9 ~ 0.00195: Adam's steps of
    ~lr = 8e-4 are below half a spacing, so round-to-nearest storage cannot move them.
    Returns the flip tracker's stall ratio per layer, the initial and the final loss.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen)
    y = torch.tanh(x @ torch.randn(16, 1, generator=gen))
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    with torch.no_grad():
        for p in model.parameters():
            magnitude = 0.25 + 0.25 * torch.rand(p.shape, generator=gen)
            sign = torch.where(torch.rand(p.shape, generator=gen) < 0.5, -1.0, 1.0)
            p.copy_((sign * magnitude).to(torch.bfloat16).float())
    opt = AdamW(model.parameters(), lr=lr, weight_decay=0.0, seed=0, **storage)
    tracker = WeightFlipTracker()
    weights = {name: p for name, p in model.named_parameters() if p.ndim >= 2}
    loss_fn = torch.nn.functional.mse_loss
    initial = loss_fn(model(x), y).item()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        for name, w in weights.items():
            tracker.snapshot_pre_step(name, w, "bfloat16", 1.0, grad=w.grad)
        opt.step()
        for name, w in weights.items():
            tracker.record_post_step(name, w, "bfloat16", 1.0)
    with torch.no_grad():
        final = loss_fn(model(x), y).item()
    return tracker.get_stall_ratios(), initial, final


def test_mlp_training_stalls_with_nearest_and_recovers_with_stochastic_rounding_and_kahan():
    _, initial, fp32_final = train({})
    stalls, _, nearest_final = train({"weight_storage": "bfloat16"})
    assert all(ratio >= 0.98 for ratio in stalls.values()), stalls  # measured: 0.99, 1.0
    assert nearest_final > 0.95 * initial  # measured: 2.026 from 2.044: nothing learned
    for storage in ({"storage_rounding": "stochastic"}, {"kahan": True}):
        stalls, _, final = train({"weight_storage": "bfloat16", **storage})
        assert all(ratio < 0.8 for ratio in stalls.values()), (storage, stalls)  # measured: ~0.72
        assert final < 1.05 * fp32_final, (storage, final, fp32_final)  # measured: 0.364, 0.362 vs 0.362


# ---- the no-master regime from the run config -------------------------------------------------------------

TINY_RUN = [
    *TINY_MODEL,
    "train.warmup_steps=2", "train.eval_interval=100", "train.eval_batches=1", "logging.progress=false",
    "diagnostics.rank_interval=100", "diagnostics.grad_stats_interval=100",
]  # fmt: skip
TIMING_KEYS = {"tokens_per_s", "elapsed_s"}


def off_grid_counts(trainer: Trainer, storage: str) -> list[int]:
    """After every optimizer step: the number of weights not equal to their rounding into the storage."""
    counts: list[int] = []

    def check(optimizer, args, kwargs) -> None:
        with torch.no_grad():
            if storage == "quantized":
                for layer in trainer.tracked.values():
                    fmt, scale = trainer.quant_info(layer.weight)
                    counts.append(int((quantize(layer.weight, fmt, scale) != layer.weight).sum()))
            else:
                for p in trainer.model.parameters():
                    counts.append(int((quantize(p, storage) != p).sum()))

    trainer.optimizer.register_step_post_hook(check)
    return counts


@pytest.mark.parametrize(
    "name, storage",
    [(name, "quantized") for name in OPTIMIZERS]
    + [("madam", "bfloat16"), ("sgd", "E5M2"), ("adamw", "none")],
)
def test_weight_storage_from_the_config_keeps_weights_in_the_format(tmp_path, name, storage):
    rounding = "stochastic" if name == "grid" else "nearest"
    config = load_config(None, [
        *TINY_RUN, f"out_dir={tmp_path}", "train.max_steps=4", f"optimizer.name={name}",
        f"optimizer.weight_storage={storage}", f"optimizer.storage_rounding={rounding}",
    ])  # fmt: skip
    trainer = Trainer(config)
    counts = off_grid_counts(trainer, storage if storage != "none" else "quantized")
    assert trainer.run()["status"] == "completed"
    assert len(counts) >= 4
    if storage == "none":  # the control: an fp32 master copy lies off the grid
        assert sum(counts) > 0
    else:
        assert sum(counts) == 0, counts


@pytest.mark.parametrize("name", ["adamw", "madam"])
def test_resume_with_stochastic_storage_and_kahan_equals_an_uninterrupted_run(tmp_path, monkeypatch, name):
    def config(run):
        return load_config(None, [
            *TINY_RUN, f"out_dir={tmp_path}", f"name={run}", "train.max_steps=12", "checkpoint.interval=6",
            f"optimizer.name={name}", "optimizer.weight_storage=quantized",
            "optimizer.storage_rounding=stochastic", "optimizer.kahan=true",
        ])  # fmt: skip

    uninterrupted = config("whole")
    run_training(uninterrupted)
    crashing = config("crashed")
    real_step = Trainer._train_step

    def crash_at_step_9(self, measure):
        if self.step == 9:
            raise RuntimeError("simulated crash")
        return real_step(self, measure)

    monkeypatch.setattr(Trainer, "_train_step", crash_at_step_9)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(crashing)
    monkeypatch.undo()
    (crashing.run_dir / "checkpoints" / "step_9.pt").unlink(missing_ok=True)  # resume from step 6
    assert resume(crashing.run_dir)["status"] == "completed"

    def records(run):
        lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]

    assert records(crashing) == records(uninterrupted)
    a = load_checkpoint(uninterrupted.run_dir / "checkpoints" / "step_12.pt")
    b = load_checkpoint(crashing.run_dir / "checkpoints" / "step_12.pt")
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    kahan = [s["kahan_comp"] for s in a["optimizer"]["state"].values() if "kahan_comp" in s]
    assert kahan and any(bool(c.abs().sum() > 0) for c in kahan)
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)
