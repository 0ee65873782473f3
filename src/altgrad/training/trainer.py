"""The training loop: a quantized GPT step by step, every measurement a component.

One step (``Trainer._train_step``), in the order of docs/architecture.md:

1. the learning rate of this step (cosine with warmup);
2. ``start_step`` of every component (the quantizers' statistics are armed on their due steps);
3. forward through the QuantizedLinears (weight and input fake-quantized), loss, backward (each
   layer's output gradient fake-quantized in the grad format);
4. ``before_step`` of every component: gradient statistics, partition-relative clipping; then the
   global gradient-norm clip;
5. ``optimizer.step()``; the flip tracker's optimizer hooks snapshot the codes before it (those the
   forward computed, no second encode) and count
   flips, updates and stall after it (``FlipDiagnostic``, the path a user's loop gets too);
6. ``after_step`` of every component (optimizer statistics, while the gradients exist); ``zero_grad``.

A step on which any component is due (or the log or eval interval) is logged: ``measure`` of every
component reads what the step collected (one host sync each), the NaN check, the evaluation, then
``on_log`` (rank health, format shifts, events); the record goes to every sink. Checkpoints hold each
component's ``state_dict`` under its name. The components are ``altgrad.diagnostics.components``'
registry plus the user's ``diagnostics.callbacks``.

A non-finite loss or weight stops the run: a ``nan_stop`` event naming the step and the layers, a
final checkpoint, ``status: nan_stop`` in the summary (the CLI exits non-zero).

Building a ``Trainer`` reads its data, builds the model and restores a checkpoint, but writes no file
and leaves the global RNGs as they were; ``run()`` starts the run folder and trains.

Example::

    >>> from altgrad.training.config import load_config
    >>> summary = train(load_config(None, ["train.max_steps=20"]))
    >>> summary["status"]
    'completed'
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from altgrad.diagnostics.components import Component, TrainingRun, build_components
from altgrad.integration import QuantizedLinear, quantize_model, quantized_layers
from altgrad.integration.quantized_linear import full_precision_forward
from altgrad.record import summarize
from altgrad.utils import seed_everything
from altgrad.versions import run_versions

from . import interventions  # noqa: F401  (registers the partition clip and format shift components)
from .checkpoint import rng_state, set_rng_state
from .compile import maybe_compile
from .config import RunConfig, apply_overrides, config_from_dict, read_yaml
from .data import BatchSampler, load_data
from .distributed import DistributedRun, SilentLogger, rank_seed, set_amax_reduction
from .interrupt import StopOnSignal
from .loggers import MetricsLogger, StepProgress
from .models import build_model
from .optimizer import optimizer_from_config
from .run_folder import RunFolder, resume_command
from .schedule import cosine_with_warmup

EVAL_SEED = 1234  # every run evaluates on the same validation windows
_EARLIER_LAYOUT = {"tracker": "flips", "rank_monitor": "rank_health", "format_shifts": "format_shift",
                   "clipper": "partition_clip"}  # fmt: skip
"""Checkpoint keys of the component states before the component seam, by component name."""


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
    ``overwrite``. Construction has no side effects on disk or on the global RNGs (see the module doc).
    """

    def __init__(self, config: RunConfig, resume: bool = False, overwrite: bool = False) -> None:
        self.config = config
        self.run_dir = config.run_dir
        self.folder = RunFolder(self.run_dir)
        self.resumed = resume
        self.dist = DistributedRun.from_env(config.train.device)  # torchrun: rank, world size, device
        if not resume and self.dist.is_main:
            self.folder.refuse_existing(overwrite)
        self.device = self.dist.device
        caller_rng = rng_state()
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
        for layer in self.layers.values():
            layer.compiled_kernels = config.quant.compiled_kernels
        self.tracked = {name: layer for name, layer in self.layers.items() if layer.weight_format is not None}
        self.layer_of_param = {id(layer.weight): layer for layer in self.tracked.values()}
        self.optimizer = self._build_optimizer()
        self.components: dict[str, Component] = build_components(config)
        run = TrainingRun(
            self.model,
            self.optimizer,
            config,
            max_steps=config.train.max_steps,
            event=lambda *args, **fields: self.logger.event(*args, **fields),
            is_main=self.dist.is_main,
            sum_across_ranks=self.dist.sum_ if self.dist.active else None,
            components=self.components,
        )
        for component in self.components.values():
            component.setup(run)
        self.step = 0
        self.precision_used = "fp32"
        self.wall_time_before = 0.0  # seconds spent on the steps before this session (a resume)
        self.session_started = time.perf_counter()
        self.start_rng = rng_state()  # what training draws from: the seeded RNGs after the model's init
        if resume:
            self._restore()
        set_rng_state(caller_rng)
        set_amax_reduction(self.model, self.dist.amax_group)
        self.step_model = maybe_compile(self.dist.wrap(self.model), config)  # DDP under torchrun
        self.logger: MetricsLogger | SilentLogger = SilentLogger()  # rank 0 alone writes the run folder

    def _open_run_folder(self) -> None:
        """A fresh run's folder (an overwritten run's files removed), or a resumed one cut back to its
        checkpoint; config.yaml and the sinks (rank 0 only); the RNGs training starts from."""
        set_rng_state(self.start_rng)
        if not self.dist.is_main:
            return
        if self.resumed:
            self.folder.truncate_after(self.step)  # drop what was logged after the checkpoint
        else:  # made only now, so a data or config error leaves no empty folder behind
            self.folder.start_fresh()
        self.folder.write_config(self.config)
        self.logger = MetricsLogger.for_run(
            self.run_dir,
            wandb=self.config.logging.wandb,
            tensorboard=self.config.logging.tensorboard,
            project=self.config.logging.wandb_project,
            config=self.config.to_dict(),
            resume_step=self.step if self.resumed else None,  # W&B resumes, TensorBoard purges replays
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
            "components": {name: component.state_dict() for name, component in self.components.items()},
            "sampler": self.sampler.state_dict(),
            "world_size": self.dist.world_size,
            "sampler_by_rank": self.dist.gather(self.sampler.state_dict()) if self.dist.active else None,
            "rng": rng_state(),
            "tokenizer": self.data.tokenizer.state(),
            "wall_time_s": self._wall_time(),
        }

    def _restore(self) -> None:
        state, skipped = self.folder.load_latest_checkpoint()
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
        saved = state.get("components") or {  # a checkpoint of the layout before components
            name: state[key] for key, name in _EARLIER_LAYOUT.items() if state.get(key) is not None
        }
        for name, component in self.components.items():
            if name in saved:  # a component added since the checkpoint starts afresh
                component.load_state_dict(saved[name])
        by_rank = state.get("sampler_by_rank")  # a data-parallel run: each rank's own stream
        self.sampler.load_state_dict(by_rank[self.dist.rank] if by_rank else state["sampler"])
        self.start_rng = state["rng"]
        self.step = state["step"]
        self.wall_time_before = state.get("wall_time_s", 0.0)

    def _save_if_due(self) -> None:
        """Checkpoint every ``checkpoint.interval`` steps (the final one is written when the run ends)."""
        if self.step % self.config.checkpoint.interval == 0 and self.step < self.config.train.max_steps:
            self.save()

    def save(self) -> None:
        state = self.state_dict()  # on every rank: it gathers each rank's sampler state
        if self.dist.is_main:
            self.folder.save_checkpoint(self.step, state, self.config.checkpoint.keep)

    # ---- one step ------------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.train.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _set_lr(self, step: int) -> float:
        """The schedule's shape comes from train.lr/min_lr; each group's height is its initial_lr."""
        train = self.config.train
        peak = cosine_with_warmup(step, train.lr, train.min_lr, train.warmup_steps, train.max_steps)
        factor = peak / train.lr
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return self.config.optimizer_lr * factor

    def _train_step(self, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """One optimizer step (the module doc's 1-6); the loss and the step's metric keys (no host sync
        of their own beyond the due components')."""
        components = self.components.values()
        record: dict[str, Any] = {"lr": self._set_lr(step)}
        for component in components:
            component.start_step(step)

        self.model.train()
        x, y = self.sampler.get_batch("train")
        with self._autocast():
            logits, loss = self.step_model(x, y)
        if logits.dtype == torch.bfloat16:
            self.precision_used = "bf16-autocast"
        loss.backward()

        for component in components:  # gradient statistics see the gradients before any clipping
            record |= component.before_step(step)
        if (max_norm := self.config.train.grad_clip) > 0:
            record["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        for component in components:  # before zero_grad: optimizer statistics read the gradients
            record |= component.after_step(step)
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        return loss.detach(), record

    def _logged(self, step: int) -> bool:
        """A step is logged when a component is due on it, or the log or eval interval (always the last)."""
        intervals = (self.config.train.log_interval, self.config.train.eval_interval)
        due = any(self._due(interval, step) for interval in intervals)
        return due or any(component.due(step) for component in self.components.values())

    def _due(self, interval: int, step: int) -> bool:
        """Whether a periodic action falls on ``step`` (always on the last step)."""
        return step % interval == 0 or step == self.config.train.max_steps

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

    def _nonfinite_layers(self) -> list[str]:
        names = [name for name, p in self.model.named_parameters()]
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).tolist()
        return [name for name, ok in zip(names, finite, strict=True) if not ok]

    # ---- the loop ------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        config = self.config
        self._open_run_folder()
        start_step = self.step
        self.logger.event(
            self.step,
            "resume" if start_step else "start",
            f"{'resumed at' if start_step else 'started'} step {self.step} on {self.device}",
        )
        for warning in self.startup_warnings if self.dist.is_main else ():  # once, not once per rank
            print(f"altgrad: warning: {warning}", file=sys.stderr)
            self.logger.event(self.step, "alert", warning)
        compiles = config.quant.rounding == "nearest" or self.device.type != "cpu"  # else all eager
        if (
            config.quant.compiled_kernels
            and compiles
            and self.layers
            and config.logging.progress
            and self.dist.is_main
        ):
            print(
                "altgrad: the first step compiles the quantize kernels (seconds, once per format; cached "
                "on disk); quant.compiled_kernels=false runs them eagerly, with the same results",
                file=sys.stderr,
            )
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
        stop = StopOnSignal().install()  # SIGINT/SIGTERM: finish the step, then stop below
        at_boundary = True  # False once an exception cut a step short: its state is half-done
        try:
            while self.step < config.train.max_steps:
                if self.dist.any(stop.requested):  # every rank stops at the same step
                    status = "interrupted"
                    stop_message = f"stopped by {stop.name}; resume with: {resume_command(self.run_dir)}"
                    break
                step = self.step + 1
                loss, record = self._train_step(step)
                window_steps += 1
                if self._logged(step):
                    elapsed, window_start = time.perf_counter() - window_start, time.perf_counter()
                    record = self._measure(step, loss, record, window_steps, elapsed)
                    window_steps = 0
                    if (stop_message := self._nan_stop(step, record)) is not None:
                        status = "nan_stop"
                        break
                    if self._due(config.train.eval_interval, step) and self.dist.is_main:
                        record |= self._eval_record()
                    for component in self.components.values():  # rank health, format shifts, events
                        record |= component.on_log(step)
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
            for component in self.components.values():
                component.close()
            if self.dist.is_main:
                self.folder.write_summary(summary)
            self.dist.close()
        return summary

    def _measure(
        self, step: int, loss: torch.Tensor, record: dict[str, Any], window_steps: int, elapsed: float
    ) -> dict[str, Any]:
        """The logged step's record: its loss, the speed of the steps since the last record, and what
        every component measured (one host sync each)."""
        tokens_per_step = self.config.train.batch_size * self.config.model.block_size
        record = {"step": step, "train_loss": float(self.dist.mean(loss)), **record}
        if "grad_norm" in record:
            record["grad_norm"] = float(record["grad_norm"])
        record["tokens"] = step * tokens_per_step
        record["tokens_per_s"] = window_steps * tokens_per_step / max(elapsed, 1e-9)
        record["elapsed_s"] = self._wall_time()
        for component in self.components.values():
            record |= component.measure(step)
        return record

    def _nan_stop(self, step: int, record: dict[str, Any]) -> str | None:
        """The stop message when the loss or a weight is non-finite (the record and a ``nan_stop`` event
        are written), else None."""
        nonfinite = self._nonfinite_layers()
        if math.isfinite(record["train_loss"]) and not nonfinite:
            return None
        what = "loss" if not math.isfinite(record["train_loss"]) else "weights"
        where = ", ".join(nonfinite) if nonfinite else "none (loss only)"
        message = f"non-finite {what} at step {step}; non-finite parameters: {where}"
        self.logger.log(record)
        self.logger.event(step, "nan_stop", message, layers=nonfinite)
        return message

    def _eval_record(self) -> dict[str, float]:
        """val_loss and val_ppl; with quantized layers also the same weights' full-precision forward loss
        (val_loss minus it = the forward's precision cost)."""
        val_loss = self.evaluate()
        record = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}
        if self.layers:
            record["val_loss_fp32_forward"] = self.evaluate(full_precision=True)
        return record

    def _summary(self, status: str, wall_time: float) -> dict[str, Any]:
        """The run's figures (``altgrad.record.summarize`` over metrics.jsonl and events.jsonl, as the
        analysis computes them) with what only the trainer knows, and each component's summary."""
        quant = self.config.quant
        summary = {
            "name": self.config.name,
            "status": status,
            "steps": self.step,
            "precision": self.precision_used,
            "quant": (
                {
                    "weight": quant.weight,
                    "activation": quant.activation,
                    "grad": quant.grad,
                    "scaling": quant.scaling,
                    "rules": len(quant.rules),
                }
                if quant.enabled
                else None
            ),
            "optimizer": self.config.optimizer.name,
            **summarize(self.folder.read_metrics(), self.folder.read_events()),
            "partition_clip_steps": None,
            "wall_time_s": wall_time,
            "world_size": self.dist.world_size,
            "versions": run_versions(),
        }
        for component in self.components.values():
            summary |= component.summary()
        return summary


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
    summary = RunFolder(config.run_dir).read_summary()
    if summary is None:
        return None
    done = summary.get("status") == "completed" and summary.get("steps", 0) >= config.train.max_steps
    return summary if done or summary.get("status") == "nan_stop" else None


def resume(run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its newest readable checkpoint, with its saved config.

    A finished run (see ``finished_summary``) is left untouched and its stored summary returned;
    ``--set train.max_steps=N`` with a larger N continues a completed run to step N."""
    config = resume_config(run_dir, overrides)
    return finished_summary(config) or train(config, resume=True)
