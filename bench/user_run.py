"""What a user sees: ``altgrad train`` on the default config, default diagnostics, against its fp32 peer.

Each pair is two runs of the CLI as a user starts it, ``--set train.max_steps=STEPS`` (and an output
folder under a temporary directory): the default config (W/A E4M3, G E5M2, flips every step, quant
statistics every 10, rank and eval every 50, progress lines), and the same with
``--set quant.enabled=false``. The figure is each run's summary ``tokens_per_s`` (the median over its
logged steps of tokens / wall seconds since the previous logged step; eval and rank steps included),
medians over ``--pairs`` interleaved pairs (their order alternating), and their ratio: how many times
more time per token the quantized run takes. ``--set`` applies to both runs, ``--quantized-set`` to
the quantized one only (e.g. ``diagnostics.flips=false`` to see what the flips cost).

    python bench/user_run.py [--pairs 3] [--steps 40] [--set KEY=VALUE] [--quantized-set KEY=VALUE]
                             [--json PATH]

Prints both medians and the ratio; writes JSON (``--json``, default ``bench/results/user_run.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from results_json import add_json_argument, write_results


def run_cli(out_dir: str, name: str, steps: int, overrides: list[str]) -> float:
    """One ``altgrad train`` in a subprocess; its summary's tokens_per_s."""
    command = [sys.executable, "-m", "altgrad", "train", "--overwrite"]
    for override in [f"out_dir={out_dir}", f"name={name}", f"train.max_steps={steps}", *overrides]:
        command += ["--set", override]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"run {name} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return float(json.loads((Path(out_dir) / name / "summary.json").read_text())["tokens_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--set", dest="both", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quantized-set", action="append", default=[], metavar="KEY=VALUE")
    add_json_argument(parser, "user_run")
    args = parser.parse_args()

    variants = {
        "default (quantized)": [*args.both, *args.quantized_set],
        "fp32 peer (quant.enabled=false)": [*args.both, "quant.enabled=false"],
    }
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as out_dir:
        for pair in range(args.pairs):
            order = list(variants) if pair % 2 == 0 else list(variants)[::-1]
            for name in order:
                run_name = f"pair{pair}_{'quantized' if name.startswith('default') else 'fp32'}"
                speeds[name].append(run_cli(out_dir, run_name, args.steps, variants[name]))
                print(f"pair {pair + 1}/{args.pairs} {name}: {speeds[name][-1]:.0f} tokens/s", flush=True)
    quantized, peer = (statistics.median(speeds[name]) for name in variants)
    ratio = peer / quantized
    print(f"{'run':<36}{'median tokens/s':>16}")
    for name in variants:
        print(f"{name:<36}{statistics.median(speeds[name]):>16.0f}")
    print(f"time per token, default / fp32 peer: {ratio:.2f}x  (target <= 1.30x; "
          f"pairs {args.pairs}, {args.steps} steps each)")  # fmt: skip
    result = {
        "steps": args.steps,
        "pairs": args.pairs,
        "overrides_both": args.both,
        "overrides_quantized": args.quantized_set,
        "tokens_per_s": speeds,
        "median_tokens_per_s": {"quantized": quantized, "fp32_peer": peer},
        "time_per_token_ratio": ratio,
        "per_pair_ratio": [p / q for q, p in zip(*speeds.values(), strict=True)],
        "target_ratio_max": 1.3,
    }
    write_results(args.json, result)


if __name__ == "__main__":
    main()
