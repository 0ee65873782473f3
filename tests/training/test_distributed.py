"""Data-parallel training: the amax reduction on two spawned gloo ranks, and 2-process torchrun runs
against the single-process run with the same global batch (CPU only, no network)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from altgrad.integration.quantized_linear import LayerQuantSpec, QuantizedLinear
from altgrad.quantization import E4M3, E5M2
from altgrad.training.config import load_config
from altgrad.training.distributed import DistributedRun, rank_seed
from altgrad.training.trainer import Trainer

SRC = Path(__file__).resolve().parents[2] / "src"
TINY = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "model.block_size=32",
    "train.batch_size=8",
    "train.max_steps=15",
    "train.warmup_steps=3",
    "train.eval_interval=15",
    "train.eval_batches=2",
    "diagnostics.rank_interval=5",
    "diagnostics.quant_stats_interval=5",
    "checkpoint.interval=10",
    "logging.progress=false",
]
# rank r's input and output gradient are filled with these magnitudes: the global amax is rank 1's input
# and rank 0's gradient, so each rank alone would pick a different scale
INPUT_AMAX = (3.0, 40.0)
GRAD_AMAX = (7.0, 0.5)


def _scales_of_one_rank(rank: int, init_file: str, reduce: bool, scaling: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    layer = QuantizedLinear(
        nn.Linear(16, 4), LayerQuantSpec(weight=E4M3, activation=E4M3, grad=E5M2, scaling=scaling)
    )
    if reduce:
        for kind in ("activation", "grad"):
            layer.quantizers[kind].amax_group = dist.group.WORLD
    x = torch.full((2, 16), INPUT_AMAX[rank])
    x[0, 0] = -INPUT_AMAX[rank]  # the amax is a magnitude
    layer(x).backward(torch.full((2, 4), GRAD_AMAX[rank]))
    out[rank] = {kind: float(layer.quantizers[kind].last_scale) for kind in ("activation", "grad")}
    dist.destroy_process_group()


def _scales_on_two_ranks(tmp_path, reduce: bool, scaling: str) -> dict:
    out = mp.Manager().dict()
    mp.spawn(
        _scales_of_one_rank, args=(str(tmp_path / f"init_{reduce}_{scaling}"), reduce, scaling, out), nprocs=2
    )
    return dict(out)


@pytest.mark.parametrize("scaling", ["delayed", "current"])
def test_amax_reduction_gives_every_rank_the_global_scale(tmp_path, scaling):
    scales = _scales_on_two_ranks(tmp_path, reduce=True, scaling=scaling)
    # by hand: amax / max_finite with E4M3 max 448 and E5M2 max 57344
    expected = {"activation": 40.0 / 448.0, "grad": 7.0 / 57344.0}
    for rank in (0, 1):
        assert scales[rank] == pytest.approx(expected, rel=1e-6)


def test_without_the_reduction_the_ranks_disagree(tmp_path):
    scales = _scales_on_two_ranks(tmp_path, reduce=False, scaling="current")
    assert scales[0]["activation"] == pytest.approx(3.0 / 448.0)
    assert scales[1]["activation"] == pytest.approx(40.0 / 448.0)


def _weight_checks_of_one_rank(rank: int, init_file: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    run = DistributedRun(rank=rank, world_size=2, device=torch.device("cpu"))
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(0.25)
        model.bias.zero_()
        same = run.weights_identical(model)
        model.weight[1, 2] += 2.0**-20 * rank  # one ulp-sized difference on rank 1
        out[rank] = (same, run.weights_identical(model))
    dist.destroy_process_group()


def test_weights_identical_sees_one_differing_element(tmp_path):
    out = mp.Manager().dict()
    mp.spawn(_weight_checks_of_one_rank, args=(str(tmp_path / "init"), out), nprocs=2)
    assert dict(out) == {0: (True, False), 1: (True, False)}


def test_rank_seeds_are_distinct_and_rank_0_keeps_the_run_seed():
    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(7, rank) for rank in range(8)} | {rank_seed(8, rank) for rank in range(8)}
    assert len(seeds) == 16


def test_a_global_batch_that_does_not_divide_is_refused():
    run = DistributedRun(rank=0, world_size=3, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="train.batch_size 8 is the global batch .* world size 3"):
        run.local_batch(8)


def _altgrad(*args: str, nproc: int, cwd: Path) -> subprocess.CompletedProcess:
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    )
    env = os.environ | {"PYTHONPATH": str(SRC), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, *launcher, "-m", "altgrad", "train", *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same config (global batch 8) on one process and on two torchrun ranks of 4 each."""
    tmp = tmp_path_factory.mktemp("ddp")
    overrides = [arg for o in [*TINY, f"out_dir={tmp / 'runs'}"] for arg in ("--set", o)]
    _altgrad(*overrides, "--set", "name=single", nproc=1, cwd=tmp)
    _altgrad(*overrides, "--set", "name=ddp", nproc=2, cwd=tmp)
    return tmp


def test_two_ranks_train_like_one_process_with_the_same_global_batch(two_runs):
    single = json.loads((two_runs / "runs/single/summary.json").read_text())
    ddp = json.loads((two_runs / "runs/ddp/summary.json").read_text())
    assert (single["world_size"], ddp["world_size"], ddp["status"]) == (1, 2, "completed")
    # different sequences on each rank (their own seeds): close, not equal
    assert ddp["final_train_loss"] == pytest.approx(single["final_train_loss"], rel=0.05)
    assert ddp["final_val_loss"] == pytest.approx(single["final_val_loss"], rel=0.03)
    assert ddp["final_train_loss"] != single["final_train_loss"]
    steps = [r["step"] for r in _records(two_runs / "runs/ddp/metrics.jsonl")]
    assert steps == [r["step"] for r in _records(two_runs / "runs/single/metrics.jsonl")]  # one record a step
    assert steps == sorted(set(steps))
    final = _records(two_runs / "runs/ddp/metrics.jsonl")[-1]
    assert final["tokens"] == 15 * 8 * 32  # the global batch


def test_only_rank_0_writes(two_runs):
    kinds = [e["kind"] for e in _records(two_runs / "runs/ddp/events.jsonl")]
    assert kinds.count("start") == 1 and kinds.count("end") == 1
    assert sorted(p.name for p in two_runs.iterdir()) == ["runs"]  # nothing in the working directory
    assert sorted(p.name for p in (two_runs / "runs").iterdir()) == ["ddp", "single"]
    assert sorted(p.name for p in (two_runs / "runs/ddp/checkpoints").iterdir()) == [
        "step_10.pt",
        "step_15.pt",
    ]


def test_resume_with_the_same_world_size_equals_the_uninterrupted_run(two_runs):
    copy = two_runs / "runs/ddp_resumed"
    shutil.copytree(two_runs / "runs/ddp", copy)
    (copy / "checkpoints/step_15.pt").unlink()
    (copy / "summary.json").unlink()
    _altgrad("--resume", str(copy), nproc=2, cwd=two_runs)
    resumed, uninterrupted = _records(copy / "metrics.jsonl"), _records(two_runs / "runs/ddp/metrics.jsonl")
    timing = {"tokens_per_s", "elapsed_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == [
        {k: v for k, v in r.items() if k not in timing} for r in uninterrupted
    ]


def test_resume_with_another_world_size_is_refused(two_runs):
    config = load_config(None, [*TINY, f"out_dir={two_runs / 'runs'}", "name=ddp"])
    with pytest.raises(ValueError, match="trained on 2 process\\(es\\), this launch has 1"):
        Trainer(config, resume=True)
