"""The optimizer registry: a new optimizer is a class plus one entry, the config and the trainer need no
edit; each entry declares its lr unit; composed weight storage; the subclasses chain ``__init__``."""

from __future__ import annotations

import json

import pytest
import torch

from altgrad.quantization import E4M3
from altgrad.training.config import ConfigError, load_config
from altgrad.training.optimizer import (
    OPTIMIZERS,
    AdamW,
    GridOptim,
    Madam,
    ManifoldAdamW,
    OnGridStorage,
    OptimizerEntry,
    WeightStorage,
    build_optimizer,
)
from altgrad.training.trainer import Trainer
from tiny_runs import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_RUN = [
    *TINY_MODEL,
    "train.warmup_steps=0", "train.eval_interval=100", "train.eval_batches=1", "logging.progress=false",
    "diagnostics.rank_interval=100", "diagnostics.grad_stats_interval=100", "train.weight_decay=0",
]  # fmt: skip


class SignSGD(torch.optim.Optimizer):
    """A toy optimizer from outside altgrad: ``w <- w - lr sign(g)``, lr in weight units."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])
        return None


@pytest.fixture
def sign_sgd(monkeypatch):
    """``sign_sgd`` registered for one test: its whole wiring is this one entry."""
    monkeypatch.setitem(OPTIMIZERS, "sign_sgd", OptimizerEntry(SignSGD, "sign", 0.25, ("weight_decay",)))


def test_a_registered_toy_optimizer_trains_a_run_from_the_config(tmp_path, sign_sgd):
    overrides = [*TINY_RUN, f"out_dir={tmp_path}", "train.max_steps=3", "optimizer.name=sign_sgd"]
    config = load_config(None, overrides)
    assert config.optimizer_lr == 0.25  # its entry's default in its own unit
    trainer = Trainer(config)
    assert type(trainer.optimizer) is SignSGD
    quantized = trainer.optimizer.param_groups[0]
    assert quantized["lr"] == quantized["initial_lr"] == 0.25
    before = {id(p): p.detach().clone() for p in quantized["params"]}
    seen: list[int] = []

    def check(optimizer, args, kwargs) -> None:  # after the first step every weight moved lr * sign(g)
        if not seen:
            lr = quantized["lr"]  # the schedule's lr at step 1, below the peak 0.25
            assert 0 < lr < 0.25
            for p in quantized["params"]:
                assert torch.equal(p.detach(), before[id(p)] - lr * torch.sign(p.grad))
        seen.append(1)

    trainer.optimizer.register_step_post_hook(check)
    assert trainer.run()["status"] == "completed"
    assert len(seen) == 3
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3]
    assert "flips/total" in records[0]  # the flip tracker follows a foreign optimizer as any other


def test_config_names_come_from_the_registry(sign_sgd):
    assert load_config(None, ["optimizer.name=sign_sgd"]).optimizer.name == "sign_sgd"
    with pytest.raises(ConfigError) as error:
        load_config(None, ["optimizer.name=lion"])
    assert str(error.value) == (
        "config key 'optimizer.name': got 'lion'; allowed: adamw, manifold_adamw, grid, sgd, madam, sign_sgd"
    )


def test_unregistered_names_are_refused_by_config_and_factory():
    with pytest.raises(ConfigError, match="optimizer.name.: got 'sign_sgd'"):
        load_config(None, ["optimizer.name=sign_sgd"])
    with pytest.raises(ValueError, match="'sign_sgd' is not one of adamw, manifold_adamw, grid, sgd, madam$"):
        build_optimizer("sign_sgd", [torch.nn.Parameter(torch.ones(2))], lr=0.1)


@pytest.mark.parametrize(
    ("name", "mode", "unit", "lr"),
    [  # the units of the module docstring, the defaults of OptimizerConfig's docstring (train.lr = 0.002)
        ("adamw", "ulp_step", "weight", 0.002),
        ("sgd", "ulp_step", "weight", 0.002),
        ("manifold_adamw", "ulp_step", "ulp", 1.0),
        ("manifold_adamw", "grad_scale", "weight", 0.002),
        ("grid", "ulp_step", "rung", 1.0),
        ("madam", "ulp_step", "log|w|", 0.01),
    ],
)
def test_each_entry_declares_its_lr_unit_and_default(name, mode, unit, lr):
    overrides = [f"optimizer.name={name}", f"optimizer.manifold_mode={mode}", "train.lr=0.002"]
    config = load_config(None, overrides)
    assert OPTIMIZERS[name].unit(mode)[0] == unit
    assert config.optimizer_lr == lr


def test_the_factory_passes_an_optimizer_only_the_options_its_entry_takes(sign_sgd):
    opt = build_optimizer("sign_sgd", [torch.nn.Parameter(torch.ones(2))], lr=0.1, weight_decay=0.5,
                          quant_info=lambda p: None, momentum=0.9, rung_clip=2.0, seed=0)  # fmt: skip
    assert opt.param_groups[0]["weight_decay"] == 0.5 and set(opt.defaults) == {"lr", "weight_decay"}


def test_weight_storage_is_an_object_the_optimizer_holds():
    w = torch.nn.Parameter(torch.ones(2))
    adamw = AdamW([w], weight_storage="E4M3", kahan=True)
    assert type(adamw.storage) is WeightStorage and adamw.param_groups[0]["kahan"]
    grid = GridOptim([w], weight_storage="quantized", storage_rounding="stochastic")
    assert type(grid.storage) is OnGridStorage and "weight_storage" not in grid.param_groups[0]


@pytest.mark.parametrize("cls", [ManifoldAdamW, GridOptim, Madam])
def test_subclasses_chain_adamw_init(monkeypatch, cls):
    calls = []
    real_init = AdamW.__init__

    def spy(self, *args, **kwargs):
        calls.append(type(self))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(AdamW, "__init__", spy)
    opt = cls([torch.nn.Parameter(torch.ones(2))], quant_info=lambda p: (E4M3, 1.0))
    assert calls == [cls] and opt.param_groups[0]["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_returns_the_closure_loss(name):
    w = torch.nn.Parameter(torch.ones(4))
    opt = build_optimizer(name, [w], lr=0.1, quant_info=lambda p: (E4M3, 1.0), seed=0)

    def closure():
        opt.zero_grad()
        loss = (w * torch.arange(4.0)).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 6.0
