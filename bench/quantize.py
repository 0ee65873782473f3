"""Throughput of ``quantize`` next to torch's native float8 round trip and ml_dtypes', in one process.

For each size (float32 tensors of standard-normal values), one timed call of each variant per
repeat, variants interleaved so that they share the machine's noise; the table shows the median
time (and the minimum), Melem/s at the median, and ``vs native``: how many times faster than
``x.to(torch.float8_e4m3fn).float()`` at the median (> 1 is faster). ``stoch/near``: the median
stochastic time over the median nearest time of the same format.

Variants: torch native E4M3 round trip; ml_dtypes' ``astype(float8_e4m3fn).astype(float32)``;
``quantize`` with rounding nearest and stochastic for E4M3, E5M2, E3M4, E7M0; with ``--compile``
also ``quantize_compiled`` (torch.compile) for E4M3 nearest and stochastic, after checking that it
agrees with ``quantize`` bit for bit (on the CPU its stochastic rounding runs the eager kernels).

Prints a table, writes ``bench/results/quantize.json``.

    python bench/quantize.py [--sizes 1M,4M,16M] [--repeats 15] [--threads N] [--compile]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

from altgrad.jsonio import write_json_atomic
from altgrad.quantization import quantize
from altgrad.quantization.formats import E3M4, E4M3, E5M2, E7M0

FORMATS = {"E4M3": E4M3, "E5M2": E5M2, "E3M4": E3M4, "E7M0": E7M0}


def parse_size(text: str) -> int:
    text = text.strip().upper()
    factor = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * factor)


def variants(x: torch.Tensor, compile_: bool) -> dict[str, Callable[[], object]]:
    generator = torch.Generator().manual_seed(0)
    out: dict[str, Callable[[], object]] = {
        "native e4m3fn round trip": lambda: x.to(torch.float8_e4m3fn).to(torch.float32),
        "ml_dtypes e4m3fn round trip": lambda: torch.from_numpy(
            x.numpy().astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        ),
    }
    for name, fmt in FORMATS.items():
        out[f"quantize {name} nearest"] = lambda fmt=fmt: quantize(x, fmt)
        out[f"quantize {name} stochastic"] = lambda fmt=fmt: quantize(
            x, fmt, rounding="stochastic", generator=generator
        )
    if compile_:
        from altgrad.quantization.ops import quantize_compiled

        out["compiled E4M3 nearest"] = lambda: quantize_compiled(x, E4M3)
        out["compiled E4M3 stochastic"] = lambda: quantize_compiled(
            x, E4M3, rounding="stochastic", generator=generator
        )
    return out


def check_compiled(x: torch.Tensor) -> None:
    """The compiled path must agree with the eager one bit for bit (stochastic: same generator seed)."""
    from altgrad.quantization.ops import quantize_compiled

    for rounding in ("nearest", "stochastic"):
        eager = quantize(x, E4M3, rounding=rounding, generator=torch.Generator().manual_seed(1))
        fused = quantize_compiled(x, E4M3, rounding=rounding, generator=torch.Generator().manual_seed(1))
        if not torch.equal(eager, fused):
            raise SystemExit(f"quantize_compiled ({rounding}) differs from quantize")


def measure(size: int, repeats: int, compile_: bool) -> dict[str, tuple[float, float]]:
    """Median and minimum seconds per variant."""
    torch.manual_seed(0)
    x = torch.randn(size)
    runs = variants(x, compile_)
    for run in runs.values():  # warm-up (and compilation)
        run()
    if compile_:
        check_compiled(x)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,4M,16M", help="comma-separated element counts (K/M suffixes)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also time quantize_compiled (torch.compile)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]

    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {args.repeats} repeats")
    header = (
        f"{'elements':>10}  {'variant':<28} {'median ms':>10} {'min ms':>8} {'Melem/s':>9} "
        f"{'vs native':>9} {'stoch/near':>10}"
    )
    print(header)
    print("-" * len(header))
    for size in sizes:
        timings = measure(size, args.repeats, args.compile)
        native = timings["native e4m3fn round trip"][0]
        for name, (seconds, fastest) in timings.items():
            ratio_to_nearest = None
            if "stochastic" in name:
                ratio_to_nearest = seconds / timings[name.replace("stochastic", "nearest")][0]
            row = {
                "elements": size,
                "variant": name,
                "median_ms": seconds * 1e3,
                "min_ms": fastest * 1e3,
                "melem_per_s": size / seconds / 1e6,
                "speedup_vs_native": native / seconds,
                "stochastic_over_nearest": ratio_to_nearest,
            }
            rows.append(row)
            stoch = f"{ratio_to_nearest:10.2f}" if ratio_to_nearest is not None else " " * 10
            print(
                f"{size:>10}  {name:<28} {row['median_ms']:10.2f} {row['min_ms']:8.2f} "
                f"{row['melem_per_s']:9.0f} {row['speedup_vs_native']:9.2f} {stoch}"
            )
        print()

    result = {
        "benchmark": "quantize",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "rows": rows,
    }
    out = Path(__file__).parent / "results" / "quantize.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
