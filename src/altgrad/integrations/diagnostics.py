"""altgrad's diagnostics on someone else's training loop: what the HF and Lightning callbacks share.

The components are those of altgrad's own trainer (``altgrad.diagnostics.components``), not a second
implementation: ``FlipDiagnostic`` (the optimizer's step hooks around a ``WeightFlipTracker``),
``QuantStatsDiagnostic`` over the ``QuantizedLinear`` statistics, and ``RankHealth``. The metric keys
are those of docs/run_folder.md (``flips/{layer}``, ``stall_ratio/mean``, ``quant/rel_error/weight``,
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
from collections.abc import Iterable
from typing import Any

from torch import nn

from altgrad.diagnostics.components import (
    FlipDiagnostic,
    QuantStatsDiagnostic,
    RankHealth,
    TrainingRun,
    amax_scale,
)
from altgrad.diagnostics.flips import FlipTrackerHooks, WeightFlipTracker
from altgrad.quantization.types import FormatLike

log = logging.getLogger("altgrad")

__all__ = ["TrainingDiagnostics", "amax_scale"]


class TrainingDiagnostics:
    """Flips, quantization statistics and rank health of a model trained by any loop (see the module doc).

    ``attach(model, optimizers)`` before training, ``collect_quant_stats(True/False)`` around each
    training step (keeps evaluation forwards out of the statistics), ``record(step)`` at log steps,
    ``detach()`` after.
    """

    def __init__(
        self, format: FormatLike | None = None, *, predict_stall: bool = True, rank_health: bool = True
    ) -> None:
        self.flips = FlipDiagnostic(format, interval=None, predict_stall=predict_stall)
        self.quant_stats = QuantStatsDiagnostic(interval=None)
        self.rank_health = RankHealth(interval=None) if rank_health else None
        self.rank_warnings: list[dict[str, Any]] = []  # {"step", "layer", "metric", "message"}
        self.model: nn.Module | None = None
        self._hooks: list[FlipTrackerHooks] = []

    @property
    def tracker(self) -> WeightFlipTracker:
        """The flip counts."""
        return self.flips.tracker

    def attach(self, model: nn.Module, optimizers: Iterable[Any]) -> None:
        """Hook the flip tracker onto each optimizer (torch optimizers or wrappers holding one as
        ``.optimizer``) for the weights of ``model`` it updates; start the statistics afresh."""
        self.detach()
        run = TrainingRun(model, event=self._rank_warning)
        self.flips.setup(run)
        if not self.flips.tracks_anything:
            raise ValueError(
                "format: the model has no QuantizedLinear with a weight format; pass a format (e.g. "
                "format='E4M3') to track its weight matrices at a per-tensor amax scale"
            )
        self._hooks = [self.flips.hook(optimizer) for optimizer in optimizers]
        self.quant_stats.setup(run)
        self.quant_stats.collect(False)
        if self.rank_health is not None:
            self.rank_health.setup(run)
        self.model = model

    def _rank_warning(self, step: int, kind: str, message: str, **fields: Any) -> dict[str, Any]:
        self.rank_warnings.append({"step": step, **fields, "message": message})
        log.warning("step %d: %s", step, message)
        return {"step": step, "kind": kind, "message": message, **fields}

    def collect_quant_stats(self, on: bool) -> None:
        """Count the quantization statistics of the forwards and backwards that follow (training steps)."""
        self.quant_stats.collect(on)

    def record(self, step: int) -> dict[str, float]:
        """The metric keys since the previous record (flips: summed over its optimizer steps); one host
        sync for the flips, one for the quant statistics, one for the ranks."""
        if self.model is None:
            raise RuntimeError("record: call attach(model, optimizers) first")
        record = self.flips.measure(step)
        steps = max((c["steps"] for c in self.flips.last_counts.values()), default=0)
        record = (record | {"flip_steps": steps}) if steps else {}
        record |= self.quant_stats.measure(step)
        if self.rank_health is not None:
            record |= self.rank_health.on_log(step)
        return record

    def detach(self) -> None:
        """Remove the optimizer hooks and stop collecting statistics (the counts stay readable)."""
        for hooks in self._hooks:
            hooks.remove()
        self._hooks = []
        self.flips.close()  # the quantized forwards stop keeping weight codes
        if self.model is not None:
            self.quant_stats.collect(False)
