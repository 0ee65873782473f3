"""``AltGradCallback`` for the Hugging Face ``Trainer``: flips, stall, quant statistics and rank health
in its logs.

Usage::

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[AltGradCallback()])
    trainer.train()
    trainer.state.log_history[-2]["stall_ratio/mean"]

Constructed with no arguments it tracks every ``QuantizedLinear`` of the model (``quantize_model``) at
its own format and current scale; ``AltGradCallback(format="E4M3")`` tracks every weight matrix of an
unquantized model in E4M3 at a per-tensor amax scale (``TrainingDiagnostics`` states the details).

Flips are counted on every optimizer step through the optimizer's step hooks: the Trainer's default
fused AdamW, behind accelerate's wrapper, once per ``gradient_accumulation_steps`` micro-batches. At
each training log (every ``logging_steps``) the keys of docs/run_folder.md are added to that record of
``trainer.state.log_history`` and to the ``logs`` handed to the callbacks after this one. The
Trainer calls its ``report_to`` callbacks (wandb, tensorboard, ...) *before* those passed in
``callbacks=``; ``AltGradCallback().add_to(trainer)`` puts it first, so they log its keys too.
Evaluation forwards are kept out of the quant statistics.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from altgrad.quantization.types import FormatLike

from .diagnostics import TrainingDiagnostics


class AltGradCallback(TrainerCallback):
    """altgrad's diagnostics in a Hugging Face ``Trainer``'s logs (see the module docstring)."""

    def __init__(
        self, format: FormatLike | None = None, *, predict_stall: bool = True, rank_health: bool = True
    ) -> None:
        self.diagnostics = TrainingDiagnostics(format, predict_stall=predict_stall, rank_health=rank_health)
        self._recorded_step: int | None = None

    def add_to(self, trainer: Trainer) -> AltGradCallback:
        """Add this callback to ``trainer`` ahead of every other, so its ``report_to`` sinks log the keys."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.diagnostics.attach(kwargs["model"], [kwargs["optimizer"]])
        self._recorded_step = state.global_step

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.diagnostics.collect_quant_stats(True)  # the micro-batches of one optimizer step

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.diagnostics.collect_quant_stats(False)  # evaluation may follow

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # only training records ("loss"), once per step: not evaluation or end-of-training summaries
        if logs is None or "loss" not in logs or state.global_step == self._recorded_step:
            return
        self._recorded_step = state.global_step
        record = self.diagnostics.record(state.global_step)
        logs.update(record)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(record)  # the Trainer stored a copy of logs before on_log

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.diagnostics.detach()
