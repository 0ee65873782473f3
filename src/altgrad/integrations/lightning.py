"""``AltGradCallback`` for Lightning: flips, stall, quant statistics and rank health logged with the
module's own metrics.

Usage::

    trainer = lightning.pytorch.Trainer(max_steps=1000, callbacks=[AltGradCallback()])
    trainer.fit(module, loader)

Constructed with no arguments it tracks every ``QuantizedLinear`` of the LightningModule at its own
format and current scale; ``AltGradCallback(format="E4M3")`` tracks every weight matrix of an
unquantized module in E4M3 at a per-tensor amax scale (``TrainingDiagnostics`` states the details).

Flips are counted on every optimizer step through the step hooks of ``trainer.optimizers``: with
automatic optimization the step runs the closure (forward and backward) inside ``optimizer.step``, and
with ``accumulate_grad_batches`` it comes once per accumulated batches. The scale of a quantized layer
is the one of its latest forward before the step (for a closure step, the previous step's forward).
Every ``trainer.log_every_n_steps`` optimizer steps the keys of docs/run_folder.md go to
``pl_module.log_dict`` (on_step, as float64 tensors: counts stay exact), so every logger writes them
in the row of that step. Validation
forwards are kept out of the quant statistics.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from altgrad.quantization.types import FormatLike

from .diagnostics import TrainingDiagnostics


class AltGradCallback(pl.Callback):
    """altgrad's diagnostics in a Lightning ``Trainer``'s logs (see the module docstring)."""

    def __init__(
        self, format: FormatLike | None = None, *, predict_stall: bool = True, rank_health: bool = True
    ) -> None:
        self.diagnostics = TrainingDiagnostics(format, predict_stall=predict_stall, rank_health=rank_health)
        self._recorded_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.diagnostics.attach(pl_module, trainer.optimizers)
        self._recorded_step = trainer.global_step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.diagnostics.collect_quant_stats(True)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.diagnostics.collect_quant_stats(False)  # validation may follow
        step, every = trainer.global_step, trainer.log_every_n_steps
        # Lightning writes the step's logs now when an optimizer step just made global_step a multiple
        if step == self._recorded_step or every == 0 or step % every != 0:
            return
        self._recorded_step = step
        # float64: Lightning makes a number float32, which rounds counts above 2^24 (flips/total)
        record = {
            key: torch.tensor(value, dtype=torch.float64)
            for key, value in self.diagnostics.record(step).items()
        }
        pl_module.log_dict(record, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.diagnostics.detach()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.diagnostics.detach()
