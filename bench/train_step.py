"""Step time of the default model: fake-quantized (W/A E4M3, G E5M2) vs fp32 vs bf16 autocast.

One training step = forward + backward + AdamW step on a batch of the default shape, all variants
in this process, interleaved, median of ``--repeats`` timed steps after warm-up. Prints a table and
writes ``bench/results/train_step.json``.

    python bench/train_step.py [--repeats 20] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

from altgrad.integration import QuantPlan, quantize_model
from altgrad.jsonio import write_json_atomic
from altgrad.training.config import load_config
from altgrad.training.model import GPT, GPTConfig

VOCAB_SIZE = 65  # the shipped character-level corpus has about this many symbols


def build_variant(name: str, model_config: GPTConfig) -> tuple[GPT, contextlib.AbstractContextManager]:
    torch.manual_seed(0)
    model = GPT(model_config)
    autocast: contextlib.AbstractContextManager = contextlib.nullcontext()
    if name == "quantized E4M3/E5M2":
        quantize_model(model, QuantPlan(weight="E4M3", activation="E4M3", grad="E5M2"))
    elif name == "bf16 autocast":
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    return model, autocast


def time_steps(model: GPT, autocast, batch: tuple[torch.Tensor, torch.Tensor], repeats: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        with autocast:
            _, loss = model(*batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 3:  # warm-up steps are not timed
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    config = load_config(None)
    batch_size = args.batch_size or config.train.batch_size
    model_config = GPTConfig(
        block_size=config.model.block_size,
        vocab_size=VOCAB_SIZE,
        n_layer=config.model.n_layer,
        n_head=config.model.n_head,
        n_embd=config.model.n_embd,
        dropout=0.0,
        bias=config.model.bias,
    )
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(VOCAB_SIZE, (batch_size, config.model.block_size), generator=generator)
    y = torch.randint(VOCAB_SIZE, (batch_size, config.model.block_size), generator=generator)

    names = ["fp32", "bf16 autocast", "quantized E4M3/E5M2"]
    variants = {name: build_variant(name, model_config) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(3):  # interleave variants so machine noise hits them alike
        for name, (model, autocast) in variants.items():
            times[name] += time_steps(model, autocast, (x, y), max(1, args.repeats // 3))
    medians = {name: statistics.median(values) for name, values in times.items()}
    tokens = batch_size * config.model.block_size
    shape = f"{config.model.n_layer}x{config.model.n_embd}, batch {batch_size}x{config.model.block_size}"
    print(f"default model {shape}, {torch.get_num_threads()} threads")
    print(f"{'variant':<22}{'median step ms':>16}{'tokens/s':>12}{'vs fp32':>10}")
    rows = []
    for name in names:
        ratio = medians[name] / medians["fp32"]
        print(f"{name:<22}{medians[name] * 1e3:>16.1f}{tokens / medians[name]:>12.0f}{ratio:>9.2f}x")
        rows.append(
            {
                "variant": name,
                "median_step_s": medians[name],
                "tokens_per_s": tokens / medians[name],
                "ratio_vs_fp32": ratio,
            }
        )
    out = Path(__file__).parent / "results" / "train_step.json"
    out.parent.mkdir(exist_ok=True)
    write_json_atomic(out, {"batch_size": batch_size, "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
