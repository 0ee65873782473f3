"""Data-parallel training under torchrun: one process per device, gradients averaged by DDP.

``torchrun --standalone --nproc_per_node N -m altgrad train CONFIG`` sets ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``; with ``WORLD_SIZE > 1`` the trainer calls ``DistributedRun.from_env`` which
initialises ``torch.distributed`` (nccl on CUDA, gloo on the CPU; multi-node rendezvous is
torchrun's business) and puts rank r on ``cuda:LOCAL_RANK`` when it trains on a GPU.

The contract:

* ``train.batch_size`` is the GLOBAL batch: each rank draws ``batch_size / world_size`` sequences
  (an error when it does not divide), so a run's tokens per step, learning rate and loss are those of
  the single-process run with the same ``batch_size``.
* Rank r draws its batches from its own generator, seeded ``rank_seed(seed, r)`` (rank 0: the run
  seed itself, so a one-process run is unchanged). The model init, the global torch RNG (dropout,
  stochastic rounding) and the optimizer's seed are the run seed on every rank, so the weights stay
  bit-identical: flips and updates are measured on every rank and agree.
* Activation and gradient amax are reduced with ``all_reduce(MAX)`` before a per-tensor scale is
  used (Transformer Engine's ``reduce_amax``), so every rank quantizes with the same scale
  (``set_amax_reduction``). Rowwise, per-channel and MX scales are local to a row or a block and need
  no reduction; weights are identical on every rank.
* Quant statistics are sums (counts, squared errors): they are summed over ranks before fractions are
  formed, i.e. a fraction is the count-weighted mean of the ranks' fractions. Gradient statistics are
  computed on the DDP-averaged gradients, identical on every rank. ``train_loss`` is the mean of the
  ranks' losses (equal shares of the global batch).
* Rank 0 alone writes the run folder (config, metrics, events, checkpoints, summary) and evaluates;
  the other ranks log to a ``SilentLogger``.

Example::

    >>> run = DistributedRun.from_env("cpu")   # no torchrun: world_size 1, nothing initialised
    >>> run.world_size, run.is_main, run.local_batch(32)
    (1, True, 32)
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .device import resolve_device


def is_main_process() -> bool:
    """Whether this process is rank 0 of its torchrun job, or runs alone (reads ``RANK``)."""
    return int(os.environ.get("RANK", "0")) == 0


def rank_seed(seed: int, rank: int) -> int:
    """Rank r's data seed: the run seed for rank 0, else a 31-bit draw of ``SeedSequence([seed, r])``."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass
class DistributedRun:
    """This process's place in a data-parallel run (world_size 1: a plain single-process run)."""

    rank: int
    world_size: int
    device: torch.device
    amax_group: Any = None  # process group of the amax reductions
    flag_group: Any = None  # gloo group (CPU tensors, no device sync) for the per-step stop flag

    @classmethod
    def from_env(cls, device_setting: str) -> DistributedRun:
        """Join the torchrun job described by the environment, or a one-process run without one."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        device = resolve_device(device_setting)
        if world_size == 1:
            return cls(rank=0, world_size=1, device=device)
        if device.type == "cuda":  # each rank on its local rank's GPU
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            device=device,
            amax_group=dist.new_group(),
            flag_group=dist.new_group(backend="gloo"),
        )

    @property
    def is_main(self) -> bool:
        """Whether this rank writes the run folder (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def local_batch(self, batch_size: int) -> int:
        """This rank's share of the global ``train.batch_size``."""
        if batch_size % self.world_size:
            raise ValueError(
                f"train.batch_size {batch_size} is the global batch and must divide by the world size "
                f"{self.world_size}"
            )
        return batch_size // self.world_size

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module a training step calls: the model itself, or a DDP wrapper sharing its Parameters.
        Buffers are not broadcast (each rank's quant statistics are its own until ``sum_``)."""
        if not self.active:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel
        newer = "forward_sync_buffers" in inspect.signature(ddp).parameters  # torch 2.13 renamed it
        no_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
        return ddp(model, device_ids=device_ids, **no_sync)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over ranks, in place (itself when alone)."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over ranks (a new tensor)."""
        return self.sum_(tensor.detach().clone()) / self.world_size if self.active else tensor

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (every rank gets the same answer: they stop together)."""
        if not self.active:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.flag_group)
        return bool(value.item())

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (e.g. each rank's sampler state for a checkpoint)."""
        if not self.active:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def weights_identical(self, model: nn.Module) -> bool:
        """Whether every rank holds the same weights: the float64 sum and sum of squares of all
        Parameters, compared by all_reduce MAX of (v, -v)."""
        if not self.active:
            return True
        params = [p.detach().double() for p in model.parameters()]
        fingerprint = torch.stack([sum(p.sum() for p in params), sum(p.square().sum() for p in params)])
        both = torch.cat([fingerprint, -fingerprint])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return bool(torch.equal(both[:2], fingerprint) and torch.equal(-both[2:], fingerprint))

    def close(self) -> None:
        """Leave the process group (after the last collective)."""
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def set_amax_reduction(model: nn.Module, group: Any) -> None:
    """Make the activation and gradient quantizers of every QuantizedLinear in ``model`` reduce their
    per-tensor amax with ``all_reduce(MAX)`` over ``group`` before using it (None: no reduction)."""
    from altgrad.integration.quantized_linear import QuantizedLinear

    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            for kind in ("activation", "grad"):
                module.quantizers[kind].amax_group = group


class SilentLogger:
    """What a non-zero rank logs to: nothing (rank 0 writes the run's metrics and events)."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def event(self, step: int, kind: str, message: str, **fields: Any) -> dict[str, Any]:
        return {"step": step, "kind": kind, "message": message, **fields}

    def close(self) -> None:
        pass
