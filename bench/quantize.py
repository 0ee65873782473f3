"""Throughput of ``quantize`` next to torch's native float8 round trip and ml_dtypes', in one process.

For each size (float32 tensors of standard-normal values), one timed call of each variant per
repeat, variants interleaved so that they share the machine's noise; the table shows the median
time (and the minimum), Melem/s at the median, and ``vs native``: how many times faster than
the peer, torch's own ``x.to(torch.float8_e4m3fn).float()``, at the median (> 1 is faster).
``stoch/near``: the median stochastic time over the median nearest time of the same format.

Stochastic rounding runs in the working float's own subnormals (see quantization/_engine.py), and
x86 CPUs take a microcode assist of ~100 cycles for each float op whose operand or result is
subnormal. The share of inputs in a format's subnormal range (|x / scale| < 2^emin) therefore sets
its stochastic cost: for standard-normal inputs at scale 1, E3M4 (emin = -2) has 20% of them there,
E4M3 (2^-6) 1.2%, E5M2 (2^-14) none; ``x 16`` rows time the same formats on 16 x the inputs (E3M4:
1.3% left), where the outlier goes away. The table's ``sub %`` column gives that share.

Variants: torch native E4M3 round trip; ml_dtypes' ``astype(float8_e4m3fn).astype(float32)``;
``quantize`` with rounding nearest and stochastic for E4M3, E5M2, E3M4, E7M0; with ``--compile``
also ``quantize_compiled`` (torch.compile) for E4M3 nearest and stochastic, after checking that it
agrees with ``quantize`` bit for bit (on the CPU its stochastic rounding runs the eager kernels).

Prints a table, writes JSON (``--json``, default ``bench/results/quantize.json``; git-ignored).

    python bench/quantize.py [--sizes 1M,4M,16M] [--repeats 15] [--threads N] [--compile] [--json PATH]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import ml_dtypes
import numpy as np
import torch

from altgrad.quantization import quantize
from altgrad.quantization.formats import E3M4, E4M3, E5M2, E7M0
from results_json import add_json_argument, write_results

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
    wide = x * 16
    for name, fmt in FORMATS.items():
        out[f"quantize {name} nearest"] = lambda fmt=fmt: quantize(x, fmt)
        out[f"quantize {name} stochastic"] = lambda fmt=fmt: quantize(
            x, fmt, rounding="stochastic", generator=generator
        )
    for name in ("E4M3", "E3M4"):  # fewer inputs in the subnormal range
        fmt = FORMATS[name]
        out[f"quantize {name} x 16 nearest"] = lambda fmt=fmt: quantize(wide, fmt)
        out[f"quantize {name} x 16 stochastic"] = lambda fmt=fmt: quantize(
            wide, fmt, rounding="stochastic", generator=generator
        )
    if compile_:
        out["compiled E4M3 nearest"] = lambda: quantize(x, E4M3, compiled=True)
        out["compiled E4M3 stochastic"] = lambda: quantize(
            x, E4M3, rounding="stochastic", generator=generator, compiled=True
        )
    return out


def check_compiled(x: torch.Tensor) -> None:
    """The compiled path must agree with the eager one bit for bit (stochastic: same generator seed)."""
    for rounding in ("nearest", "stochastic"):
        eager = quantize(x, E4M3, rounding=rounding, generator=torch.Generator().manual_seed(1))
        generator = torch.Generator().manual_seed(1)
        fused = quantize(x, E4M3, rounding=rounding, generator=generator, compiled=True)
        if not torch.equal(eager, fused):
            raise SystemExit(f"quantize(compiled=True) ({rounding}) differs from quantize")


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
    parser.add_argument("--compile", action="store_true", help="also time quantize(compiled=True)")
    add_json_argument(parser, "quantize")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]

    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {args.repeats} repeats")
    print("peer: torch's native float8_e4m3fn round trip, same process, interleaved")
    header = (
        f"{'elements':>10}  {'variant':<34} {'median ms':>10} {'min ms':>8} {'Melem/s':>9} "
        f"{'vs native':>9} {'stoch/near':>10} {'sub %':>6}"
    )
    print(header)
    print("-" * len(header))
    for size in sizes:
        timings = measure(size, args.repeats, args.compile)
        native = timings["native e4m3fn round trip"][0]
        torch.manual_seed(0)
        x = torch.randn(size)  # the inputs measure() timed
        for name, (seconds, fastest) in timings.items():
            fmt = next((f for key, f in FORMATS.items() if f"quantize {key} " in name), None)
            subnormal = None
            if fmt is not None:
                inputs = x * 16 if " x 16 " in name else x
                subnormal = float((inputs.abs() < fmt.min_normal).float().mean()) * 100
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
                "subnormal_range_percent": subnormal,
            }
            rows.append(row)
            stoch = f"{ratio_to_nearest:10.2f}" if ratio_to_nearest is not None else " " * 10
            sub = f"{subnormal:6.1f}" if subnormal is not None else " " * 6
            print(
                f"{size:>10}  {name:<34} {row['median_ms']:10.2f} {row['min_ms']:8.2f} "
                f"{row['melem_per_s']:9.0f} {row['speedup_vs_native']:9.2f} {stoch} {sub}"
            )
        print()

    result = {
        "benchmark": "quantize",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "peer": "native e4m3fn round trip",
        "rows": rows,
    }
    write_results(args.json, result)


if __name__ == "__main__":
    main()
