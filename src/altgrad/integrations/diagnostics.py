"""altgrad's diagnostics on someone else's training loop: what the HF and Lightning callbacks share.

The components are those of altgrad's own trainer, not a second implementation: ``FlipTrackerHooks``
(the optimizer's step hooks around a ``WeightFlipTracker``), ``quant_stats_record`` over the
``QuantizedLinear`` statistics, and ``RankHealthMonitor`` with ``rank_stats``. The metric keys are those
of docs/run_folder.md (``flips/{layer}``, ``stall_ratio/mean``, ``quant/rel_error/weight``,
``effective_rank/{param}``, ...).

Which weights, in which format, at which scale:

* every ``QuantizedLinear`` with a weight format: its own format at its current scale
  (``weight_scale()``, the scale of its latest forward), named by module as in altgrad's trainer;
* with ``format=``, every other weight matrix (2+-dim parameter) the optimizer updates (all of
  them on an unquantized model) in that format at a per-tensor amax scale taken at the snapshot
  before each step:
  ``s = amax(|W|) / max_finite`` (1 when amax is 0 or not finite). Both codes of a step are taken at
  that one ``s``, so a flip is a move of the weight, never a change of scale.

What a record holds (``record()``, called at the host's log steps):

    flips/, updates/, drift_flips/   summed over the optimizer steps since the previous record
    flip_steps                       how many optimizer steps those sums cover
    stall_ratio/                     1 - updated flips / updates of those sums
    flip_rate/, update_ulps/         per element and optimizer step
    quant/...                        over the training forwards and backwards since the previous record
                                     (``collect_quant_stats(True)`` around each training step)
    stable_rank/, effective_rank/    of every 2-D parameter now (and ``*_quantized`` of the weight the
                                     forward uses); rank-collapse warnings go to ``rank_warnings`` and
                                     the ``altgrad`` logger

Flips are counted per optimizer step (the hooks fire on ``optimizer.step()``, once per accumulated
batch, and not at all for a step the host skips), with fused optimizers, closure steps and wrappers.

Example (any loop)::

    diagnostics = TrainingDiagnostics(format="E4M3")
    diagnostics.attach(model, [optimizer])
    for step, batch in enumerate(loader, start=1):
        ...                                              # forward, backward, optimizer.step(), zero_grad
        if step % 100 == 0:
            print(diagnostics.record(step)["stall_ratio/mean"])
    diagnostics.detach()
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from altgrad.diagnostics.flips import (
    FlipTrackerHooks,
    FormatAndScale,
    WeightFlipTracker,
    layer_name,
    torch_optimizer,
)
from altgrad.diagnostics.model_stats import rank_stats
from altgrad.diagnostics.quant_stats import quant_stats_record
from altgrad.diagnostics.rank_health import RankHealthMonitor
from altgrad.integration import QuantizedLinear, quantized_layers
from altgrad.quantization.formats import get_format
from altgrad.quantization.scaling import compute_scale
from altgrad.quantization.types import FormatLike

log = logging.getLogger("altgrad")


def amax_scale(weight: torch.Tensor, fmt: FormatLike) -> torch.Tensor:
    """``amax(|W|) / max_finite`` of ``fmt`` as a float32 tensor (1 for a zero or non-finite amax); no
    host sync."""
    return compute_scale(weight.detach().abs().amax(), fmt)


class TrainingDiagnostics:
    """Flips, quantization statistics and rank health of a model trained by any loop (see the module doc).

    ``attach(model, optimizers)`` before training, ``collect_quant_stats(True/False)`` around each
    training step (keeps evaluation forwards out of the statistics), ``record(step)`` at log steps,
    ``detach()`` after.
    """

    def __init__(
        self, format: FormatLike | None = None, *, predict_stall: bool = True, rank_health: bool = True
    ) -> None:
        self.format = None if format is None else get_format(format)
        self.tracker = WeightFlipTracker(predict_stall=predict_stall)
        self.rank_monitor = RankHealthMonitor() if rank_health else None
        self.rank_warnings: list[dict[str, Any]] = []  # {"step", "layer", "metric", "message"}
        self.model: nn.Module | None = None
        self.quantized: dict[str, QuantizedLinear] = {}
        self._hooks: list[FlipTrackerHooks] = []

    def attach(self, model: nn.Module, optimizers: Iterable[Any]) -> None:
        """Hook the flip tracker onto each optimizer (torch optimizers or wrappers holding one as
        ``.optimizer``) for the weights of ``model`` it updates; start the statistics afresh."""
        self.detach()
        quantized = quantized_layers(model)
        with_format = {name: layer for name, layer in quantized.items() if layer.weight_format is not None}
        if not with_format and self.format is None:
            raise ValueError(
                "format: the model has no QuantizedLinear with a weight format; pass a format (e.g. "
                "format='E4M3') to track its weight matrices at a per-tensor amax scale"
            )
        # id(parameter) -> (layer name, its (format, scale) now). Named after the QuantizedLinear, not the
        # parameter: attach_flip_tracker would name a tied lm_head after the embedding it shares.
        tracked: dict[int, tuple[str, Callable[[], FormatAndScale]]] = {}
        for name, layer in with_format.items():
            own = lambda layer=layer: (layer.weight_format, layer.weight_scale())  # noqa: E731
            tracked[id(layer.weight)] = (name, own)
        if self.format is not None:
            fmt = self.format
            for name, p in model.named_parameters():
                if p.ndim >= 2 and id(p) not in tracked:
                    tracked[id(p)] = (layer_name(name), lambda p=p: (fmt, amax_scale(p, fmt)))
        names = {id(p): name for name, p in model.named_parameters()}
        resolve = lambda name, p: tracked[id(p)][1]()  # noqa: E731
        for optimizer in optimizers:
            optimizer = torch_optimizer(optimizer)
            updated = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
            parameters = [(tracked[id(p)][0], names[id(p)], p) for p in updated if id(p) in tracked]
            self._hooks.append(FlipTrackerHooks(self.tracker, optimizer, parameters, resolve))
        self.model, self.quantized = model, quantized
        for layer in quantized.values():
            layer.read_stats(reset=True)  # drop sums of forwards before training
        self.collect_quant_stats(False)

    def collect_quant_stats(self, on: bool) -> None:
        """Count the quantization statistics of the forwards and backwards that follow (training steps)."""
        for layer in self.quantized.values():
            layer.collect_stats = on

    def record(self, step: int) -> dict[str, float]:
        """The metric keys since the previous record (flips: summed over its optimizer steps); one host
        sync for the flips, one for the quant statistics, one for the ranks."""
        if self.model is None:
            raise RuntimeError("record: call attach(model, optimizers) first")
        counts = self.tracker.pop_step_counts()
        steps = max((c["steps"] for c in counts.values()), default=0)
        record = (self.tracker.step_metrics(counts) | {"flip_steps": steps}) if steps else {}
        record |= quant_stats_record({name: layer.read_stats() for name, layer in self.quantized.items()})
        if self.rank_monitor is not None:
            ranks = self.rank_monitor.compute_layer_ranks(self.model)
            record |= rank_stats(ranks)
            self.rank_monitor.check_warnings(ranks)
            for warning in self.rank_monitor.last_warnings:
                self.rank_warnings.append({"step": step, **warning})
                log.warning("step %d: %s", step, warning["message"])
        return record

    def detach(self) -> None:
        """Remove the optimizer hooks and stop collecting statistics (the counts stay readable)."""
        for hooks in self._hooks:
            hooks.remove()
        self._hooks = []
        self.collect_quant_stats(False)
