"""Cost of the discrete-dynamics diagnostics next to the training step they watch.

Model: the nanoGPT Shakespeare shape, 6 layers x 384 wide (c_attn 384x1152, c_proj 384x384, c_fc
384x1536, mlp c_proj 1536x384 per layer, 65 x 384 tied embedding / lm_head, 256 positions): ~10.7M
parameters, batch 8 x 256 tokens.

1. Flip tracking. Each timed step is fp32 forward + backward + AdamW, with ``snapshot_pre_step`` on
   every 2+-dim weight before ``optimizer.step()`` and ``record_post_step`` (with the grad) after
   (E4M3, both codes encoded every step: nothing is inferred from the version counter). The
   tracker's calls and the step are timed separately within the same steps: ``tracker / step``
   (target <= 5%). The trainer's path, where a quantized forward hands its weight codes to the
   snapshot, is timed as the same steps with the codes encoded outside the tracker's time (the
   forward's work), beside what keeping those codes costs the forward (``quantize`` vs
   ``quantize_keeping_codes`` of every weight) and the two encoders (``ops.encode`` vs the native
   cast of ``quantization.codes``). Also, interleaved, whole steps with ``attach_flip_tracker`` hooks
   vs plain steps, and one ``pop_step_metrics()`` read.
2. Rank health. ``RankHealthMonitor.compute_layer_ranks`` (batched float64 Gram eigenvalues; and its
   ``method="svd"``: batched float64 svdvals in tall orientation) vs the naive loop: one
   ``torch.linalg.svdvals`` per weight as stored, in float64 (the precision the metrics are defined
   in) and in float32, metrics from its singular values, each read with float(). Target >= 2x.

Medians of ``--repeats``; variants interleaved. Prints a table, writes JSON (``--json``, default
``bench/results/diagnostics.json``).

    python bench/diagnostics.py [--repeats 15] [--rank-threads 1] [--device cpu] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from altgrad.diagnostics.rank_health import rank_metrics_from_singular_values
from altgrad.quantization import (
    E4M3,
    RankHealthMonitor,
    WeightFlipTracker,
    attach_flip_tracker,
    encode,
    quantize,
)
from altgrad.quantization.codes import native_encode, quantize_keeping_codes
from altgrad.training.model import GPT, GPTConfig
from results_json import add_json_argument, write_results

VOCAB_SIZE, BLOCK_SIZE = 65, 256


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def build(device: torch.device) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    config = GPTConfig(
        block_size=BLOCK_SIZE, vocab_size=VOCAB_SIZE, n_layer=6, n_head=6, n_embd=384, dropout=0.0
    )
    model = GPT(config).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def forward_backward(model: GPT, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    _, loss = model(*batch)
    loss.backward()


def tracked_steps(model, optimizer, batch, repeats: int, device, handed: bool) -> dict[str, list[float]]:
    """Steps with manual tracker calls; the step and the tracker's share timed apart. ``handed``: the
    snapshot gets the codes (encoded before its timer starts, as a quantized forward would)."""
    tracker = WeightFlipTracker()
    weights = {name: p for name, p in model.named_parameters() if p.ndim >= 2}
    times: dict[str, list[float]] = {"step": [], "tracker": [], "read": []}
    for i in range(repeats + 2):
        start = clock(device)
        forward_backward(model, batch)
        codes = {name: native_encode(w, E4M3) if handed else None for name, w in weights.items()}
        after_backward = clock(device)
        for name, w in weights.items():
            tracker.snapshot_pre_step(name, w, E4M3, 1.0, codes=codes[name])
        after_snapshot = clock(device)
        optimizer.step()
        after_step = clock(device)
        for name, w in weights.items():
            tracker.record_post_step(name, w, E4M3, 1.0, grad=w.grad)
        after_post = clock(device)
        optimizer.zero_grad(set_to_none=True)
        read_start = clock(device)
        tracker.pop_step_metrics()
        read_end = clock(device)
        if i >= 2:  # the first step encodes twice (no previous post-step codes) and warms up
            times["step"].append((after_backward - start) + (after_step - after_snapshot))
            times["tracker"].append((after_snapshot - after_backward) + (after_post - after_step))
            times["read"].append(read_end - read_start)
    return times


def plain_steps(model, optimizer, batch, repeats: int, device) -> list[float]:
    times = []
    for i in range(repeats + 2):
        start = clock(device)
        forward_backward(model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(clock(device) - start)
    return times


def naive_ranks(model: GPT, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """One svdvals per weight as stored, metrics from it, read one by one."""
    ranks = {}
    for name, p in model.named_parameters():
        if p.ndim < 2:
            continue
        s = torch.linalg.svdvals(p.detach().to(dtype))
        metrics = rank_metrics_from_singular_values(s)
        ranks[name] = {key: float(value) for key, value in metrics.items()}
    return ranks


def time_call(fn, device) -> float:
    start = clock(device)
    fn()
    return clock(device) - start


def all_weights(fn: Callable, weights: list[torch.Tensor], scale: torch.Tensor) -> Callable[[], list]:
    return lambda: [fn(w, E4M3, scale) for w in weights]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank-threads", type=int, default=1, help="torch threads for the rank timings")
    parser.add_argument("--device", default="cpu")
    add_json_argument(parser, "diagnostics")
    args = parser.parse_args()
    device = torch.device(args.device)

    model, optimizer = build(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_tracked = sum(p.numel() for p in model.parameters() if p.ndim >= 2)
    generator = torch.Generator().manual_seed(0)
    batch = tuple(
        torch.randint(VOCAB_SIZE, (args.batch_size, BLOCK_SIZE), generator=generator).to(device)
        for _ in range(2)
    )

    # ---- 1. flip tracking ---------------------------------------------------------------------------------
    tracked = {"step": [], "tracker": [], "read": []}
    handed = {"step": [], "tracker": [], "read": []}
    hooked_times, plain_times = [], []
    hooked_model, hooked_optimizer = build(device)
    hooks = attach_flip_tracker(hooked_model, hooked_optimizer, default_format=E4M3)
    plain_model, plain_optimizer = build(device)
    handed_model, handed_optimizer = build(device)
    rounds = 3
    n = args.repeats // rounds
    for _ in range(rounds):  # interleaved so machine noise hits every variant alike
        for key, values in tracked_steps(model, optimizer, batch, n, device, handed=False).items():
            tracked[key] += values
        for key, values in tracked_steps(
            handed_model, handed_optimizer, batch, n, device, handed=True
        ).items():
            handed[key] += values
        hooked_times += plain_steps(hooked_model, hooked_optimizer, batch, n, device)
        plain_times += plain_steps(plain_model, plain_optimizer, batch, n, device)
    hooks.remove()
    step_s = statistics.median(tracked["step"])
    tracker_s = statistics.median(tracked["tracker"])
    fractions = [t / s for t, s in zip(tracked["tracker"], tracked["step"], strict=True)]
    handed_fractions = [t / s for t, s in zip(handed["tracker"], handed["step"], strict=True)]
    hooked_s, plain_s = statistics.median(hooked_times), statistics.median(plain_times)

    # what keeping the codes costs a quantized forward, and the two encoders, over every weight
    weights = [p.detach() for p in model.parameters() if p.ndim >= 2]
    scale = torch.tensor(0.02, device=device)
    per_weight = {
        "quantize (the forward's weight)": all_weights(quantize, weights, scale),
        "quantize_keeping_codes": all_weights(quantize_keeping_codes, weights, scale),
        "ops.encode": all_weights(lambda w, f, s: encode(w, f, s, check_nan=False), weights, scale),
        "native_encode (codes.py)": all_weights(native_encode, weights, scale),
    }
    per_weight_times: dict[str, list[float]] = {name: [] for name in per_weight}
    for fn in per_weight.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in per_weight.items():
            per_weight_times[name].append(time_call(fn, device))
    per_weight_s = {name: statistics.median(values) for name, values in per_weight_times.items()}

    # ---- 2. rank health -----------------------------------------------------------------------------
    threads = torch.get_num_threads()
    torch.set_num_threads(args.rank_threads)
    variants = {
        "naive svdvals float64": lambda: naive_ranks(model, torch.float64),
        "naive svdvals float32": lambda: naive_ranks(model, torch.float32),
        "monitor method=svd": lambda: RankHealthMonitor(method="svd").compute_layer_ranks(model),
        "monitor method=gram": lambda: RankHealthMonitor(method="gram").compute_layer_ranks(model),
    }
    rank_times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(max(3, args.repeats // 3)):
        for name, fn in variants.items():
            rank_times[name].append(time_call(fn, device))
    torch.set_num_threads(threads)
    rank_medians = {name: statistics.median(values) for name, values in rank_times.items()}
    reference = naive_ranks(model, torch.float64)
    deviation = {}
    for name in ("monitor method=svd", "monitor method=gram", "naive svdvals float32"):
        ranks = variants[name]()
        deviation[name] = max(
            abs(ranks[p][m] - reference[p][m]) / abs(reference[p][m]) for p in reference for m in reference[p]
        )

    # ---- report -------------------------------------------------------------------------------------
    print(f"model 6x384, {n_params / 1e6:.2f}M parameters ({n_tracked / 1e6:.2f}M tracked), "
          f"batch {args.batch_size}x{BLOCK_SIZE}, device {device}, {threads} threads, "
          f"medians of {len(fractions)}")  # fmt: skip
    print(f"{'flip tracking (E4M3)':<44}{'median ms':>12}{'vs fp32 step':>14}")
    print(f"{'fp32 fwd+bwd+AdamW step':<44}{step_s * 1e3:>12.1f}{'1.00x':>14}")
    print(f"{'tracker: snapshot + post-step, all weights':<44}{tracker_s * 1e3:>12.1f}"
          f"{statistics.median(fractions):>13.1%}")  # fmt: skip
    handed_s = statistics.median(handed["tracker"])
    print(f"{'tracker given the forward codes (trainer)':<44}{handed_s * 1e3:>12.1f}"
          f"{statistics.median(handed_fractions):>13.1%}")  # fmt: skip
    print(f"{'tracker: pop_step_metrics() read':<44}{statistics.median(tracked['read']) * 1e3:>12.2f}")
    print(f"{'step with attach_flip_tracker hooks':<44}{hooked_s * 1e3:>12.1f}{hooked_s / plain_s:>13.2f}x")
    print(f"{'step without hooks':<44}{plain_s * 1e3:>12.1f}{'1.00x':>14}")
    print()
    print(f"{'every weight once, E4M3 at a tensor scale':<44}{'median ms':>12}")
    for name, median in per_weight_s.items():
        print(f"{name:<44}{median * 1e3:>12.1f}")
    print()
    print(f"{'rank metrics, all 2+-dim weights':<44}{'median ms':>12}{'speed-up':>14}{'max rel dev':>14}"
          f"   ({args.rank_threads} thread)")  # fmt: skip
    naive64 = rank_medians["naive svdvals float64"]
    gram_vs_float32 = rank_medians["naive svdvals float32"] / rank_medians["monitor method=gram"]
    for name, median in rank_medians.items():
        dev = f"{deviation[name]:.1e}" if name in deviation else "reference"
        print(f"{name:<44}{median * 1e3:>12.1f}{naive64 / median:>13.2f}x{dev:>14}")
    print(f"{'  (gram vs naive svdvals float32)':<44}{'':>12}{gram_vs_float32:>13.2f}x")

    result = {
        "model": {"n_layer": 6, "n_embd": 384, "parameters": n_params, "tracked_elements": n_tracked},
        "batch": [args.batch_size, BLOCK_SIZE],
        "device": str(device),
        "threads": threads,
        "rank_threads": args.rank_threads,
        "repeats": len(fractions),
        "flip_tracking": {
            "format": "E4M3",
            "fp32_step_median_s": step_s,
            "tracker_median_s": tracker_s,
            "tracker_fraction_of_step_median": statistics.median(fractions),
            "pop_step_metrics_median_s": statistics.median(tracked["read"]),
            "hooked_step_median_s": hooked_s,
            "plain_step_median_s": plain_s,
            "hooked_vs_plain": hooked_s / plain_s,
            "handed_codes_tracker_median_s": handed_s,
            "handed_codes_fraction_of_step_median": statistics.median(handed_fractions),
            "every_weight_median_s": per_weight_s,
            "target_fraction_max": 0.05,
        },
        "rank_health": {
            "median_s": rank_medians,
            "speedup_vs_naive_float64": {name: naive64 / m for name, m in rank_medians.items()},
            "gram_speedup_vs_naive_float32": gram_vs_float32,
            "max_relative_deviation_vs_naive_float64": deviation,
            "target_speedup_min": 2.0,
        },
    }  # fmt: skip
    print()
    write_results(args.json, result)


if __name__ == "__main__":
    main()
