"""The training loop: a quantized GPT step by step, with the discrete-dynamics diagnostics.

One step, in the order of DESIGN.md:

1. forward through the QuantizedLinears (weight and input fake-quantized; autograd saves the
   quantized weight), loss;
2. backward (each layer's output gradient fake-quantized in the grad format);
3. gradient statistics (every ``grad_stats_interval``), clipping;
4. ``WeightFlipTracker.snapshot_pre_step`` for each quantized weight (the codes the forward computed,
   and a float copy for the predicted stall, held only through the step);
5. ``optimizer.step()``;
6. flips, updates, measured and predicted stall, update ulps per layer (codes at the pre-step scale);
   optimizer statistics while the gradients exist;
7. every ``rank_interval``: rank health, trend warnings recorded as events;
8. metrics to the sinks, with one host sync per logged step.

A non-finite loss or weight stops the run: a ``nan_stop`` event naming the step and the layers, a
final checkpoint, ``status: nan_stop`` in the summary (the CLI exits non-zero).

Example::

    >>> from altgrad.training.config import load_config
    >>> summary = train(load_config(None, ["train.max_steps=20"]))
    >>> summary["status"]
    'completed'
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from altgrad.diagnostics.flips import WeightFlipTracker
from altgrad.diagnostics.model_stats import compute_gradient_stats, rank_stats
from altgrad.diagnostics.optimizer_stats import optimizer_statistics
from altgrad.diagnostics.quant_stats import quant_stats_record
from altgrad.diagnostics.rank_health import RankHealthMonitor
from altgrad.integration import QuantizedLinear, quantize_model, quantized_layers
from altgrad.integration.quantized_linear import full_precision_forward
from altgrad.jsonio import dumps_strict, write_json_atomic, write_text_atomic
from altgrad.utils import seed_everything
from altgrad.versions import run_versions

from .checkpoint import load_latest_valid, rng_state, save_checkpoint, set_rng_state
from .compile import maybe_compile
from .config import RunConfig, apply_overrides, config_from_dict, read_yaml, save_config
from .data import BatchSampler, load_data
from .distributed import DistributedRun, SilentLogger, rank_seed, set_amax_reduction
from .interrupt import StopOnSignal
from .interventions import FormatShiftController, PartitionRelativeClipper
from .loggers import MetricsLogger, StepProgress
from .models import build_model
from .optimizer import optimizer_from_config
from .run_folder import refuse_existing_run, resume_command, start_fresh
from .schedule import cosine_with_warmup

EVAL_SEED = 1234  # every run evaluates on the same validation windows


def format_width_warnings(config: RunConfig) -> list[str]:
    """One warning per quantization format that is not 8 bits wide (a custom split such as E4M4)."""
    if not config.quant.enabled:
        return []
    return [
        f"format {fmt.name} is {fmt.total_bits} bits wide, not 8: this run is not an 8-bit experiment"
        for fmt in config.quant.plan().formats()
        if fmt.total_bits != 8
    ]


class Trainer:
    """Builds everything a run needs from its config; ``run()`` trains and returns the summary.

    A fresh run under a name that already holds a run is refused (RunExistsError) unless
    ``overwrite``; the run folder is made only once the data and the model are built."""

    def __init__(self, config: RunConfig, resume: bool = False, overwrite: bool = False) -> None:
        self.config = config
        self.run_dir = config.run_dir
        self.dist = DistributedRun.from_env(config.train.device)  # torchrun: rank, world size, device
        if not resume and self.dist.is_main:
            refuse_existing_run(self.run_dir, overwrite)
        self.device = self.dist.device
        seed_everything(config.seed)  # the same init on every rank

        self.data = load_data(**config.data.model_dump())
        self.sampler = BatchSampler(  # each rank its share of the global batch, from its own seed
            self.data,
            self.dist.local_batch(config.train.batch_size),
            config.model.block_size,
            seed=rank_seed(config.seed, self.dist.rank),
            device=self.device,
        )
        self.model = build_model(config, self.data.tokenizer.vocab_size).to(self.device)
        self.startup_warnings: list[str] = []
        if config.quant.enabled:
            surgery = quantize_model(self.model, config.quant.plan())
            self.startup_warnings = [
                f"quant rule {p!r} matched no Linear layer" for p in surgery.unmatched_rules
            ]
        self.startup_warnings += format_width_warnings(config)
        self.layers: dict[str, QuantizedLinear] = quantized_layers(self.model)
        self.tracked = {name: layer for name, layer in self.layers.items() if layer.weight_format is not None}
        self.layer_of_param = {id(layer.weight): layer for layer in self.tracked.values()}
        self.optimizer = self._build_optimizer()
        self.tracker = WeightFlipTracker(predict_stall=True)
        for layer in self.tracked.values():  # the forward hands its weight codes to the tracker
            layer.keep_weight_codes = config.diagnostics.flips
        self.rank_monitor = RankHealthMonitor(
            log_interval=config.diagnostics.rank_interval,
            warn_threshold=config.diagnostics.rank_warn_threshold,
            warmup_checks=config.diagnostics.rank_warmup_checks,
            max_matrix_elements=config.diagnostics.max_rank_matrix_elements,
        )
        stability = config.stability
        self.format_shifts = (
            FormatShiftController(
                patience=stability.shift_patience,
                stall_threshold=stability.shift_stall_threshold,
                warmup_steps=stability.shift_warmup_steps,
                formats={name: layer.weight_format for name, layer in self.tracked.items()},
            )
            if stability.format_shift
            else None
        )
        ratio = stability.relative_grad_clip
        self.clipper = PartitionRelativeClipper(ratio) if ratio is not None else None
        self.last_clip = None
        self.step = 0
        self.best_val_loss = math.inf
        self.first_rank_warning_step: int | None = None
        self.shift_events: list[dict[str, Any]] = []
        self.precision_used = "fp32"
        self.wall_time_before = 0.0  # seconds spent on the steps before this session (a resume)
        self.session_started = time.perf_counter()
        if resume:
            self._restore()
        elif self.dist.is_main:  # made only now, so a data or config error leaves no empty folder behind
            start_fresh(self.run_dir)
        set_amax_reduction(self.model, self.dist.amax_group)
        self.step_model = maybe_compile(self.dist.wrap(self.model), config)  # DDP under torchrun
        self.logger: MetricsLogger | SilentLogger = SilentLogger()  # rank 0 alone writes the run folder
        if not self.dist.is_main:
            return
        save_config(config, self.run_dir / "config.yaml")
        self.logger = MetricsLogger.for_run(
            self.run_dir,
            wandb=config.logging.wandb,
            tensorboard=config.logging.tensorboard,
            project=config.logging.wandb_project,
            config=config.to_dict(),
            resume_step=self.step if resume else None,  # W&B resumes its run, TensorBoard purges replays
        )

    # ---- construction ------------------------------------------------------------------------------------

    def quant_info(self, param: torch.nn.Parameter) -> tuple[Any, torch.Tensor] | None:
        """The format and current scale of a quantized weight, for grid-aware optimizers."""
        layer = self.layer_of_param.get(id(param))
        if layer is None or layer.weight_format is None:
            return None
        return layer.weight_format, layer.weight_scale()

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """Groups: quantized weights (lr in the optimizer's own unit), other 2+-dim weights and the
        rest (lr in weight units, ``train.lr``); weight decay only on 2+-dim weights. A shared
        Parameter appears once. Each group's peak lr is kept as ``initial_lr`` for the schedule.
        ``weight_lr=train.lr``: the grid-aware optimizers' decay and unformatted parameters."""
        config = self.config
        params = list(dict.fromkeys(p for p in self.model.parameters() if p.requires_grad))
        quantized = [p for p in params if id(p) in self.layer_of_param]
        plain_matrices = [p for p in params if p.dim() >= 2 and id(p) not in self.layer_of_param]
        groups = [
            {"params": quantized, "weight_decay": config.train.weight_decay, "lr": config.optimizer_lr},
            {"params": plain_matrices, "weight_decay": config.train.weight_decay, "lr": config.train.lr},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": config.train.lr},
        ]
        groups = [group | {"initial_lr": group["lr"]} for group in groups if group["params"]]
        return optimizer_from_config(config.optimizer, groups, lr=config.optimizer_lr,
                                     weight_decay=config.train.weight_decay, quant_info=self.quant_info,
                                     weight_lr=config.train.lr, seed=config.seed)  # fmt: skip

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def _wall_time(self) -> float:
        """Seconds of training over every session of the run (resumes included)."""
        return self.wall_time_before + time.perf_counter() - self.session_started

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "quantizers": {name: layer.quant_state() for name, layer in self.layers.items()},
            "tracker": self.tracker.state_dict(),
            "rank_monitor": self.rank_monitor.state_dict(),
            "format_shifts": self.format_shifts.state_dict() if self.format_shifts else None,
            "clipper": self.clipper.state_dict() if self.clipper else None,
            "sampler": self.sampler.state_dict(),
            "world_size": self.dist.world_size,
            "sampler_by_rank": self.dist.gather(self.sampler.state_dict()) if self.dist.active else None,
            "rng": rng_state(),
            "tokenizer": self.data.tokenizer.state(),
            "best_val_loss": self.best_val_loss,
            "first_rank_warning_step": self.first_rank_warning_step,
            "shift_events": self.shift_events,
            "wall_time_s": self._wall_time(),
        }

    def _restore(self) -> None:
        _, state, skipped = load_latest_valid(self.run_dir / "checkpoints")
        self.startup_warnings += skipped
        if state.get("world_size", 1) != self.dist.world_size:
            raise ValueError(
                f"cannot resume {self.run_dir}: it was trained on {state.get('world_size', 1)} process(es), "
                f"this launch has {self.dist.world_size} (torchrun --nproc_per_node and --nnodes)"
            )
        if state["tokenizer"] != self.data.tokenizer.state():
            raise ValueError(
                f"cannot resume {self.run_dir}: the data's tokenizer differs from the checkpoint's "
                "(the data source, path or tokenizer changed since the run started)"
            )
        if set(state["quantizers"]) != set(self.layers):
            raise ValueError(
                f"cannot resume {self.run_dir}: the checkpoint quantized {sorted(state['quantizers'])} "
                f"but this config quantizes {sorted(self.layers)} (quant.enabled or quant.rules changed)"
            )
        for name, layer_state in state["quantizers"].items():
            formats = layer_state["formats"]
            layer = self.layers[name]
            for kind, fmt in formats.items():
                layer.set_format(kind, fmt)
            layer.load_quant_state(layer_state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.load_state_dict(state["tracker"])
        self.rank_monitor.load_state_dict(state["rank_monitor"])
        if self.format_shifts and state["format_shifts"]:
            self.format_shifts.load_state_dict(state["format_shifts"])
        if self.clipper and state["clipper"]:
            self.clipper.load_state_dict(state["clipper"])
        by_rank = state.get("sampler_by_rank")  # a data-parallel run: each rank's own stream
        self.sampler.load_state_dict(by_rank[self.dist.rank] if by_rank else state["sampler"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.best_val_loss = state["best_val_loss"]
        self.first_rank_warning_step = state["first_rank_warning_step"]
        self.shift_events = state["shift_events"]
        self.wall_time_before = state.get("wall_time_s", 0.0)
        for name in ("metrics.jsonl", "events.jsonl"):  # drop what was logged after the checkpoint
            if self.dist.is_main:
                _truncate_jsonl_after(self.run_dir / name, self.step)

    def _save_if_due(self) -> None:
        """Checkpoint every ``checkpoint.interval`` steps (the final one is written when the run ends)."""
        if self.step % self.config.checkpoint.interval == 0 and self.step < self.config.train.max_steps:
            self.save()

    def save(self) -> None:
        state = self.state_dict()  # on every rank: it gathers each rank's sampler state
        if self.dist.is_main:
            save_checkpoint(self.run_dir / "checkpoints", self.step, state, self.config.checkpoint.keep)

    # ---- one step ------------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.train.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_step(self, measure: dict[str, bool]) -> tuple[torch.Tensor, dict[str, Any]]:
        config, record = self.config, {}
        # the schedule's shape comes from train.lr/min_lr; each group's height is its initial_lr
        factor = (
            cosine_with_warmup(
                self.step + 1,
                config.train.lr,
                config.train.min_lr,
                config.train.warmup_steps,
                config.train.max_steps,
            )
            / config.train.lr
        )
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        lr = config.optimizer_lr * factor
        record["lr"] = lr
        for layer in self.layers.values():
            layer.collect_stats = measure["quant"]

        self.model.train()
        x, y = self.sampler.get_batch("train")
        with self._autocast():
            logits, loss = self.step_model(x, y)
        if logits.dtype == torch.bfloat16:
            self.precision_used = "bf16-autocast"
        loss.backward()

        if measure["grad_stats"]:
            record.update(compute_gradient_stats(self.model))
        if self.clipper is not None:
            grads = {
                name: (layer.weight.grad, layer.weight_format, layer.weight_scale())
                for name, layer in self.tracked.items()
                if layer.weight.grad is not None
            }
            self.last_clip = self.clipper.clip_(grads, step=self.step + 1)
        if config.train.grad_clip > 0:
            record["grad_norm"] = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), config.train.grad_clip
            )

        if measure["flips"]:
            for name, layer in self.tracked.items():
                codes = layer.take_weight_codes()  # the forward's: no second encode
                self.tracker.snapshot_pre_step(
                    name, layer.weight, layer.weight_format, layer.weight_scale(), codes=codes
                )
        self.optimizer.step()
        if measure["flips"]:
            for name, layer in self.tracked.items():
                self.tracker.record_post_step(
                    name, layer.weight, layer.weight_format, layer.weight_scale(), grad=layer.weight.grad
                )
        if measure["optimizer_stats"]:  # before zero_grad: grad_stiffness_corr needs the gradients
            weights = {name: layer.weight for name, layer in self.tracked.items()}
            record.update(optimizer_statistics(self.optimizer, self.quant_info, weights))
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.detach(), record

    @torch.no_grad()
    def evaluate(self, full_precision: bool = False) -> float:
        """Mean loss of the quantized model over ``eval_batches`` fixed validation windows; with
        ``full_precision``, of the same weights, quantizers bypassed (the forward-precision control)."""
        self.model.eval()
        for layer in self.layers.values():  # the quant statistics describe training steps only
            layer.collect_stats = False
        generator = torch.Generator().manual_seed(EVAL_SEED)
        losses = []
        for _ in range(self.config.train.eval_batches):
            x, y = self.data.get_batch(
                "val", self.config.train.batch_size, self.config.model.block_size, generator
            )
            bypass = full_precision_forward(self.model) if full_precision else contextlib.nullcontext()
            with self._autocast(), bypass:
                _, loss = self.model(x.to(self.device), y.to(self.device))
            losses.append(loss.float())
        return float(torch.stack(losses).mean())

    # ---- reading the diagnostics (one host sync each) ---------------------------------------------------

    def _quant_record(self) -> dict[str, float]:
        stats = {name: layer.read_stats() for name, layer in self.layers.items()}
        if self.dist.active and stats:  # sums over ranks: fractions weighted by each rank's counts
            summed = self.dist.sum_(torch.stack(list(stats.values())))
            stats = dict(zip(stats, summed, strict=True))
        return quant_stats_record(stats)

    def _rank_record(self) -> dict[str, float]:
        ranks = self.rank_monitor.compute_layer_ranks(self.model)
        record = rank_stats(ranks)
        self.rank_monitor.check_warnings(ranks)
        for warning in self.rank_monitor.last_warnings:
            if self.first_rank_warning_step is None:
                self.first_rank_warning_step = self.step
            self.logger.event(
                self.step,
                "rank_warning",
                warning["message"],
                layer=warning["layer"],
                metric=warning["metric"],
            )
        return record

    def _nonfinite_layers(self) -> list[str]:
        names = [name for name, p in self.model.named_parameters()]
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).tolist()
        return [name for name, ok in zip(names, finite, strict=True) if not ok]

    def _apply_format_shifts(self, record: dict[str, float]) -> None:
        stall = {
            name: record[f"stall_ratio/{name}"] for name in self.tracked if f"stall_ratio/{name}" in record
        }
        nonfinite = {name: record.get(f"quant/nonfinite_frac/{name}/weight", 0.0) for name in self.tracked}
        formats = {name: layer.weight_format for name, layer in self.tracked.items()}
        shifts = self.format_shifts.update(
            self.step, stall_ratios=stall, nan_counts=nonfinite, formats=formats
        )
        for shift in shifts:
            self.tracked[shift.layer].set_format("weight", shift.to_format)
            self.shift_events.append(self.logger.event(**shift.to_event()))
        for notice in self.format_shifts.pop_notices():
            self.logger.event(**notice.to_event())

    def _due(self, interval: int, step: int) -> bool:
        """Whether a periodic measurement falls on ``step`` (always on the last step)."""
        return step % interval == 0 or step == self.config.train.max_steps

    # ---- the loop ------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        config = self.config
        start_step = self.step
        self.logger.event(
            self.step,
            "resume" if start_step else "start",
            f"{'resumed at' if start_step else 'started'} step {self.step} on {self.device}",
        )
        for warning in self.startup_warnings if self.dist.is_main else ():  # once, not once per rank
            print(f"altgrad: warning: {warning}", file=sys.stderr)
            self.logger.event(self.step, "alert", warning)
        tokens_per_step = config.train.batch_size * config.model.block_size
        progress = StepProgress(  # a bar on a terminal, plain lines in a log file
            config.name,
            config.train.max_steps,
            self.step,
            config.logging.progress and self.dist.is_main,
            config.train.log_interval,
        )
        status, stop_message = "completed", None
        self.session_started = time.perf_counter()
        window_start, window_steps = time.perf_counter(), 0
        diagnostics = config.diagnostics
        stop = StopOnSignal().install()  # SIGINT/SIGTERM: finish the step, then stop below
        at_boundary = True  # False once an exception cut a step short: its state is half-done
        try:
            while self.step < config.train.max_steps:
                if self.dist.any(stop.requested):  # every rank stops at the same step
                    status = "interrupted"
                    stop_message = f"stopped by {stop.name}; resume with: {resume_command(self.run_dir)}"
                    break
                step = self.step + 1
                measure = {
                    "flips": diagnostics.flips
                    and bool(self.tracked)
                    and self._due(diagnostics.flip_interval, step),
                    "grad_stats": self._due(diagnostics.grad_stats_interval, step),
                    "quant": self._due(diagnostics.quant_stats_interval, step),
                    "optimizer_stats": bool(self.tracked)
                    and self._due(diagnostics.optimizer_stats_interval, step),
                }
                loss, record = self._train_step(measure)
                window_steps += 1
                periodic = (
                    config.train.log_interval,
                    config.train.eval_interval,
                    diagnostics.rank_interval,
                    diagnostics.optimizer_stats_interval,
                )
                # a step is logged when anything is measured on it; the NaN check runs on logged steps
                if not (any(measure.values()) or any(self._due(interval, step) for interval in periodic)):
                    self._save_if_due()
                    continue
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "train_loss": float(self.dist.mean(loss)), **record}
                if "grad_norm" in record:
                    record["grad_norm"] = float(record["grad_norm"])
                record["tokens"] = step * tokens_per_step
                record["tokens_per_s"] = window_steps * tokens_per_step / max(elapsed, 1e-9)
                record["elapsed_s"] = self._wall_time()
                window_start, window_steps = time.perf_counter(), 0
                if measure["flips"]:
                    record.update(self.tracker.pop_step_metrics())
                if measure["quant"]:
                    record.update(self._quant_record())
                nonfinite = self._nonfinite_layers()
                if not math.isfinite(record["train_loss"]) or nonfinite:
                    what = "loss" if not math.isfinite(record["train_loss"]) else "weights"
                    where = ", ".join(nonfinite) if nonfinite else "none (loss only)"
                    stop_message = f"non-finite {what} at step {step}; non-finite parameters: {where}"
                    self.logger.log(record)
                    self.logger.event(step, "nan_stop", stop_message, layers=nonfinite)
                    status = "nan_stop"
                    break
                if self._due(config.train.eval_interval, step) and self.dist.is_main:
                    last_val_loss = self.evaluate()
                    record["val_loss"] = last_val_loss
                    record["val_ppl"] = math.exp(min(last_val_loss, 700.0))
                    self.best_val_loss = min(self.best_val_loss, last_val_loss)
                    if self.layers:  # the same weights, forward unquantized: val_loss minus it = forward cost
                        record["val_loss_fp32_forward"] = self.evaluate(full_precision=True)
                if self._due(diagnostics.rank_interval, step) and self.dist.is_main:
                    record.update(self._rank_record())
                if self.format_shifts is not None and measure["flips"]:
                    self._apply_format_shifts(record)
                if self.last_clip is not None and (clip_event := self.last_clip.to_event()) is not None:
                    self.logger.event(**clip_event)
                self.logger.log(record)
                progress.show(step, record)
                self._save_if_due()
        except BaseException as error:
            # an exception may cut a step in half (amax histories, RNG, optimizer partly updated):
            # that state is never saved; the last checkpoint written at a step boundary stands
            at_boundary = False
            interrupted = isinstance(error, KeyboardInterrupt)
            status = "interrupted" if interrupted else "failed"
            stop_message = f"{type(error).__name__}: {error}" if not interrupted else "KeyboardInterrupt"
            self.logger.event(self.step, "alert", f"run {status}: {stop_message}")
            raise
        finally:
            stop.uninstall()
            progress.close()
            if at_boundary:
                self.save()
            summary = self._summary(status, self._wall_time())
            summary["signal"] = stop.name if status == "interrupted" else None
            if at_boundary and not self.dist.weights_identical(self.model):
                self.logger.event(self.step, "alert", "weights differ across ranks (data parallel broken)")
                summary["status"] = "failed"
            self.logger.event(
                self.step,
                "end",
                f"{status} at step {self.step}" + (f": {stop_message}" if stop_message else ""),
            )
            self.logger.close()
            if self.dist.is_main:
                write_json_atomic(self.run_dir / "summary.json", summary)
            self.dist.close()
        return summary

    def _summary(self, status: str, wall_time: float) -> dict[str, Any]:
        """Final figures; losses are the last ones in metrics.jsonl, so a resume keeps earlier ones."""
        flips = self.tracker.get_flip_counts()
        stalls = self.tracker.get_stall_ratios()
        metrics = _read_jsonl(self.run_dir / "metrics.jsonl")

        def measured(key: str) -> list[float]:
            return [r[key] for r in metrics if r.get(key) is not None]

        stable, effective = measured("stable_rank/min"), measured("effective_rank/min")
        speeds = measured("tokens_per_s")
        train_losses = [r.get("train_loss") for r in metrics if "train_loss" in r]
        val_loss = (measured("val_loss") or [None])[-1]
        nan_stop = status == "nan_stop"
        return {
            "name": self.config.name,
            "status": status,
            "steps": self.step,
            "precision": self.precision_used,
            "quant": (
                {
                    "weight": self.config.quant.weight,
                    "activation": self.config.quant.activation,
                    "grad": self.config.quant.grad,
                    "scaling": self.config.quant.scaling,
                    "rules": len(self.config.quant.rules),
                }
                if self.config.quant.enabled
                else None
            ),
            "optimizer": self.config.optimizer.name,
            "final_train_loss": train_losses[-1] if train_losses else None,
            "final_val_loss": val_loss,
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
            "final_val_ppl": math.exp(min(val_loss, 700.0)) if val_loss is not None else None,
            "tokens_per_s": float(np.median(speeds)) if speeds else None,
            "total_flips": int(sum(flips.values())) if flips else None,
            "mean_stall_ratio": float(np.mean(list(stalls.values()))) if stalls else None,
            "min_stable_rank": float(min(stable)) if stable else None,
            "min_effective_rank": float(min(effective)) if effective else None,
            "first_rank_warning_step": self.first_rank_warning_step,
            "collapse_step": self.step if nan_stop else None,
            "collapse_reason": "non-finite loss or weights" if nan_stop else None,
            "format_shifts": self.shift_events,
            "partition_clip_steps": self.clipper.summary() if self.clipper else None,
            "wall_time_s": wall_time,
            "world_size": self.dist.world_size,
            "versions": run_versions(),
        }


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def _truncate_jsonl_after(path: Path, step: int) -> None:
    """Keep only the records up to ``step`` (a resume replays the rest)."""
    kept = [r for r in _read_jsonl(path) if r.get("step", 0) <= step]
    write_text_atomic(path, "".join(dumps_strict(r) + "\n" for r in kept))


def train(config: RunConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train one run and return its summary (also written to ``run_dir/summary.json``).

    ``overwrite`` replaces a run already in ``run_dir``; without it such a run is refused."""
    return Trainer(config, resume=resume, overwrite=overwrite).run()


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The saved config of the run in ``run_dir`` with ``overrides`` applied."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"not a run folder (no config.yaml): {run_dir}")
    data = read_yaml(config_path)
    if not isinstance(data, dict):
        raise FileNotFoundError(f"not a run folder ({config_path} is not a run config)")
    data = apply_overrides(data, overrides or [])
    data["out_dir"], data["name"] = str(run_dir.parent), run_dir.name
    return config_from_dict(data)


def finished_summary(config: RunConfig) -> dict[str, Any] | None:
    """The stored summary when the run has nothing left to do: completed at or past
    ``train.max_steps``, or stopped on a non-finite value (training on from NaN weights means nothing)."""
    try:
        summary = json.loads((config.run_dir / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    done = summary.get("status") == "completed" and summary.get("steps", 0) >= config.train.max_steps
    return summary if done or summary.get("status") == "nan_stop" else None


def resume(run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its newest readable checkpoint, with its saved config.

    A finished run (see ``finished_summary``) is left untouched and its stored summary returned;
    ``--set train.max_steps=N`` with a larger N continues a completed run to step N."""
    config = resume_config(run_dir, overrides)
    return finished_summary(config) or train(config, resume=True)
