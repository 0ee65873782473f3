"""The realised step of each optimizer in grid units: mean |delta code ordinal| per quantized weight per step.

The tiny model (2 layers, 64 wide, E4M3 weights, fp32 master weights, weight decay 0 so that only the
step moves weights) trains ``--steps`` steps at a constant learning rate per optimizer. Before and
after every step each quantized weight's ordinal (its index in the sorted finite values of its
format) is read at the layer's pre-step scale, so a scale change is not counted as a move. Prints
``mean |d ordinal|`` per weight per step, the fraction of weights that moved, and the final loss.
Then the weight decay of each optimizer: the relative shrink per step of 100,000 zero-gradient E4M3
weights (|w| in [0.01, 0.1], scale amax/448) over 50 steps at train.lr 3e-3 and weight decay 0.1,
where AdamW's is ``lr wd = 3e-4``.

    PYTHONPATH=src python bench/optimizer_units.py [--steps 100] [--format E4M3]
"""

from __future__ import annotations

import argparse
import math
import tempfile

import torch

from altgrad.quantization import E4M3, get_format
from altgrad.quantization.ops import quantize
from altgrad.training.config import load_config
from altgrad.training.optimizer import OPTIMIZERS, build_optimizer
from altgrad.training.trainer import Trainer

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32", "train.batch_size=8",
        "train.warmup_steps=0", "train.weight_decay=0", "logging.progress=false"]  # fmt: skip
RUNS = {  # optimizer name -> optimizer.lr (its own unit)
    "adamw": 1e-3,
    "manifold_adamw": 1.0,
    "grid": 1.0,
    "madam": math.log(2) / 8,  # 1/8 binade: a step of about one E4M3 ULP (relative spacing 2^-3)
}


def ordinals(weight: torch.Tensor, fmt, scale) -> torch.Tensor:
    """Index of each weight's nearest format value in the sorted distinct finite values."""
    values = fmt.values()
    table = torch.unique(values[torch.isfinite(values)]).float()
    return torch.searchsorted(table, quantize(weight.detach().float() / scale, fmt))


def measure(name: str, lr: float, steps: int, fmt_name: str) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as out:
        config = load_config(None, [*TINY, f"out_dir={out}", f"quant.weight={fmt_name}",
                                    f"optimizer.name={name}", f"optimizer.lr={lr}"])  # fmt: skip
        trainer = Trainer(config)
        fmt = get_format(fmt_name)
        moved, changed, count = 0.0, 0.0, 0
        for _ in range(steps):
            x, y = trainer.sampler.get_batch("train")
            _, loss = trainer.model(x, y)
            loss.backward()
            scales = {n: layer.weight_scale().detach().clone() for n, layer in trainer.tracked.items()}
            before = {n: ordinals(layer.weight, fmt, scales[n]) for n, layer in trainer.tracked.items()}
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            for n, layer in trainer.tracked.items():
                delta = (ordinals(layer.weight, fmt, scales[n]) - before[n]).abs()
                moved += float(delta.sum())
                changed += float((delta != 0).sum())
                count += delta.numel()
        return moved / count, changed / count, loss.item()


def decay_per_step(name: str, steps: int = 50, lr: float = 3e-3, wd: float = 0.1) -> float:
    """``1 - (mean w_T / w_0)^(1/T)`` for zero-gradient weights, at the optimizer's default own lr."""
    gen = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(100_000, generator=gen) < 0.5, -1.0, 1.0)
    w0 = (0.01 + 0.09 * torch.rand(100_000, generator=gen)) * sign
    scale = float(w0.abs().max()) / 448
    w0 = quantize(w0, E4M3, scale)  # on the grid, where GridOptim keeps it
    w = torch.nn.Parameter(w0.clone())
    own = load_config(None, [f"optimizer.name={name}", f"train.lr={lr}"]).optimizer_lr
    opt = build_optimizer(name, [{"params": [w], "initial_lr": own}], lr=own, weight_decay=wd, weight_lr=lr,
                          quant_info=lambda p: (E4M3, scale), seed=0)  # fmt: skip
    for _ in range(steps):
        w.grad = torch.zeros_like(w0)
        opt.step()
    return 1 - float((w.detach() / w0).mean()) ** (1 / steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--format", default="E4M3")
    parser.add_argument("--only", nargs="*", default=list(RUNS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'optimizer':<16}{'lr':>10}{'mean |d ord|/step':>20}{'moved frac':>12}{'last loss':>11}")
    for name in args.only:
        ulps, frac, loss = measure(name, RUNS[name], args.steps, args.format)
        print(f"{name:<16}{RUNS[name]:>10.4g}{ulps:>20.3f}{frac:>12.3f}{loss:>11.3f}")
    print(f"\n{'optimizer':<16}{'zero-grad shrink per step (AdamW: 3.0e-04)':>44}")
    for name in OPTIMIZERS:
        print(f"{name:<16}{decay_per_step(name):>44.3e}")


if __name__ == "__main__":
    main()
