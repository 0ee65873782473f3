"""Step time of the default model: fake-quantized (W/A E4M3, G E5M2) vs fp32 vs bf16 autocast.

One training step = forward + backward + AdamW step on a batch of the default shape, all variants
in this process. After 3 warm-up steps each, ``--rounds`` rounds time ``--steps`` steps of every
variant in turn (after one untimed step); the peer is the fp32 step of the same model in the same
process, and ``vs fp32`` is the median over rounds of the round's median step over the fp32 round's
(paired by round, so that the machine's slow and fast periods cancel), with its range over rounds.
``quantized E4M3/E5M2`` is the quantized model as ``altgrad train`` runs it
(``quant.compiled_kernels: true``, the default: each tensor's amax, scale and rounding in one
compiled kernel, the same bits as eager; compiled in the warm-up); ``quantized, eager kernels`` is
the same model with ``quant.compiled_kernels: false``.
``--compile`` adds the fp32 and the quantized model through ``torch.compile`` (what
``train.compile: true`` does; compiled once in the warm-up), to show whether compiling the whole
model pays on this machine. Prints a table and writes JSON (``--json``, default
``bench/results/train_step.json``; bench/results/ is git-ignored).

    python bench/train_step.py [--rounds 7] [--steps 4] [--batch-size 32] [--compile] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from altgrad.integration import QuantizedLinear, QuantPlan, quantize_model
from altgrad.training.config import load_config
from altgrad.training.model import GPT, GPTConfig
from results_json import add_json_argument, write_results

VOCAB_SIZE = 65  # the shipped character-level corpus has about this many symbols


def build_variant(
    name: str, model_config: GPTConfig
) -> tuple[GPT, torch.nn.Module, contextlib.AbstractContextManager]:
    """The model, the module a step calls (the model or its compiled wrapper) and the autocast context."""
    torch.manual_seed(0)
    model = GPT(model_config)
    autocast: contextlib.AbstractContextManager = contextlib.nullcontext()
    if name.startswith("quantized"):
        quantize_model(model, QuantPlan(weight="E4M3", activation="E4M3", grad="E5M2"))
        for layer in model.modules():
            if isinstance(layer, QuantizedLinear):
                layer.compiled_kernels = not name.endswith("eager kernels")
    elif name == "bf16 autocast":
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    return model, torch.compile(model) if name.endswith("compiled") else model, autocast


class Stepper:
    """One variant: its model, the module a step calls, its autocast context, its AdamW (kept across
    rounds)."""

    def __init__(self, model: GPT, step_model: torch.nn.Module, autocast) -> None:
        self.model, self.step_model, self.autocast = model, step_model, autocast
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def steps(self, batch: tuple[torch.Tensor, torch.Tensor], count: int) -> list[float]:
        """Wall seconds of ``count`` training steps (forward, backward, AdamW step, zero_grad)."""
        times = []
        for _ in range(count):
            start = time.perf_counter()
            with self.autocast:
                _, loss = self.step_model(*batch)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds; each times every variant in turn")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd fp32 and quantized")
    add_json_argument(parser, "train_step")
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

    names = ["fp32", "bf16 autocast", "quantized E4M3/E5M2", "quantized, eager kernels"]
    if args.compile:
        names += ["fp32 compiled", "quantized E4M3/E5M2 compiled"]
    variants = {name: Stepper(*build_variant(name, model_config)) for name in names}
    for stepper in variants.values():
        stepper.steps((x, y), 3)  # warm-up (and compiling), not timed
    times: dict[str, list[float]] = {name: [] for name in names}
    round_ratios: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):  # every round times each variant in turn: machine noise hits them alike
        round_medians = {}
        for name, stepper in variants.items():
            stepper.steps((x, y), 1)  # back to this model's working set, not timed
            round_times = stepper.steps((x, y), args.steps)
            times[name] += round_times
            round_medians[name] = statistics.median(round_times)
        for name in names:
            round_ratios[name].append(round_medians[name] / round_medians["fp32"])
    medians = {name: statistics.median(values) for name, values in times.items()}
    tokens = batch_size * config.model.block_size
    shape = f"{config.model.n_layer}x{config.model.n_embd}, batch {batch_size}x{config.model.block_size}"
    print(f"default model {shape}, {torch.get_num_threads()} threads; peer: fp32 eager step, same process")
    print(f"{args.rounds} rounds of {args.steps} steps per variant; vs fp32 = median over rounds of the")
    print("round's median step / the fp32 round's median step (paired by round), [min, max] over rounds")
    print(f"{'variant':<36}{'median step ms':>16}{'tokens/s':>12}{'vs fp32':>10}   [min, max]")
    rows = []
    for name in names:
        ratio = statistics.median(round_ratios[name])
        low, high = min(round_ratios[name]), max(round_ratios[name])
        print(
            f"{name:<36}{medians[name] * 1e3:>16.1f}{tokens / medians[name]:>12.0f}{ratio:>9.2f}x"
            f"   [{low:.2f}, {high:.2f}]"
        )
        rows.append(
            {
                "variant": name,
                "median_step_s": medians[name],
                "tokens_per_s": tokens / medians[name],
                "ratio_vs_fp32": ratio,
                "round_ratios_vs_fp32": round_ratios[name],
            }
        )
    peer = "fp32 eager step of the same model, same process"
    result = {
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "peer": peer,
        "rows": rows,
    }
    write_results(args.json, result)


if __name__ == "__main__":
    main()
