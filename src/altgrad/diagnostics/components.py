"""Components: every measurement (and intervention) of a training step behind one small protocol.

A component is what altgrad's trainer runs and what a user attaches to their own loop (the HF and
Lightning adapters of ``altgrad.integrations`` wrap the same classes): one code path per measurement.
In the spirit of HF's ``TrainerCallback``, Lightning's ``Callback`` and torchtitan's stateful
components, a component

* is built from the run config (``from_config(config)``; the default calls ``cls()`` with no
  arguments) and attached to the model and optimizer (``setup(run)``, a ``TrainingRun``);
* says on which steps it measures (``due(step)``: every ``interval`` steps and on the last one); a
  step on which any component is due is a logged step;
* acts at four points of a step, each returning metric keys (possibly none)::

      start_step(step)     before the forward        (e.g. arm the quantizers' statistics)
      before_step(step)    gradients ready, before optimizer.step()   (gradient stats, clipping)
      after_step(step)     after optimizer.step(), before zero_grad   (optimizer statistics)
      measure(step)        at a logged step: read out what the step collected (one host sync)
      on_log(step)         at a logged step after the NaN check and the evaluation: act on a sound
                           model (rank health, format shifts, events)

* owns its checkpoint state (``state_dict``/``load_state_dict``, saved under its name) and its
  run-summary figures (``summary()``).

Registering a new diagnostic is one file with a ``Component`` subclass plus one line::

    register_component(MyDiagnostic)     # the trainer builds it with MyDiagnostic.from_config(config)

User components come from the run config (``diagnostics.callbacks: ["package.module:ClassName"]``,
loaded by ``load_component_class``): the class is built with no arguments (override ``from_config``
to read the config), checkpointed under its path, and its keys go to every sink.

Example (a user's own loop)::

    flips = FlipDiagnostic()                       # every optimizer step, via the optimizer's hooks
    flips.setup(TrainingRun(model, optimizer))
    ...                                            # train
    print(flips.measure(step)["stall_ratio/mean"])
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from altgrad.integration import QuantizedLinear, quantized_layers
from altgrad.quantization.formats import FloatFormat, get_format
from altgrad.quantization.scaling import compute_scale
from altgrad.training.optimizer import quant_info_from_model

from .flips import (
    FlipTrackerHooks,
    FormatAndScale,
    FormatLike,
    WeightFlipTracker,
    layer_name,
    torch_optimizer,
)
from .model_stats import compute_gradient_stats, rank_stats
from .optimizer_stats import optimizer_statistics
from .quant_stats import QuantStats, read_quant_stats
from .rank_health import RankHealthMonitor

if TYPE_CHECKING:
    from altgrad.training.config import RunConfig

log = logging.getLogger("altgrad")


def _no_event(step: int, kind: str, message: str, **fields: Any) -> dict[str, Any]:
    """Events of a loop without an event log go to the ``altgrad`` logger."""
    log.warning("step %d: %s", step, message)
    return {"step": step, "kind": kind, "message": message, **fields}


@dataclass
class TrainingRun:
    """What components attach to: the model (unwrapped), its optimizer, and the run's services.

    ``event(step, kind, message, **fields)`` writes events.jsonl (a user's loop: the ``altgrad``
    logger); ``sum_across_ranks`` sums a tensor over data-parallel ranks in place; ``components``
    are the run's components by name, for an intervention that reads another's typed values.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    config: RunConfig | None = None
    max_steps: int | None = None
    event: Callable[..., dict[str, Any]] = _no_event
    is_main: bool = True
    sum_across_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None
    components: dict[str, Component] = field(default_factory=dict)

    def quantized(self) -> dict[str, QuantizedLinear]:
        """The model's QuantizedLinears by module name (the model is quantized before components attach)."""
        if not hasattr(self, "_quantized"):
            self._quantized = quantized_layers(self.model)
        return self._quantized

    def tracked(self) -> dict[str, QuantizedLinear]:
        """The QuantizedLinears with a weight format (whose weights flip on a grid)."""
        return {name: layer for name, layer in self.quantized().items() if layer.weight_format is not None}

    def quant_info(self, param: nn.Parameter) -> tuple[FloatFormat, torch.Tensor] | None:
        """The format and current scale of a quantized weight (None for any other parameter): the
        optimizers' ``quant_info_from_model``, built once (one dict lookup per parameter)."""
        if not hasattr(self, "_quant_info"):
            self._quant_info = quant_info_from_model(self.model)
        return self._quant_info(param)


class Component:
    """The protocol (see the module doc); every method has a do-nothing default."""

    name: ClassVar[str] = ""
    interval: int | None = None  # due every ``interval`` steps and on the last; None: never due (the host
    # calls ``measure`` when it logs, as ``TrainingDiagnostics`` does)

    @classmethod
    def from_config(cls, config: RunConfig) -> Component | None:
        """The component a run config asks for, or None when the config turns it off."""
        return cls()

    def setup(self, run: TrainingRun) -> None:
        """Attach to ``run`` before the first step; keeps it as ``self.run`` (call ``super().setup(run)``
        when overriding)."""
        self.run = run

    def due(self, step: int) -> bool:
        """Whether the component measures on ``step``: every ``interval`` steps and on the run's last."""
        if self.interval is None:
            return False
        max_steps = getattr(getattr(self, "run", None), "max_steps", None)
        return step % self.interval == 0 or step == max_steps

    def start_step(self, step: int) -> None:
        """Before the forward of ``step``."""
        return None

    def before_step(self, step: int) -> dict[str, float]:
        """Gradients ready, before ``optimizer.step()``; may change the gradients (clipping)."""
        return {}

    def after_step(self, step: int) -> dict[str, float]:
        """After ``optimizer.step()``, before ``zero_grad`` (the gradients still exist)."""
        return {}

    def measure(self, step: int) -> dict[str, float]:
        """At a logged step, before the NaN check: read out what the step collected."""
        return {}

    def on_log(self, step: int) -> dict[str, float]:
        """At a logged step with finite loss and weights, after the evaluation: measure the model or act."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs to continue bit for bit (saved in each checkpoint under the name)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def summary(self) -> dict[str, Any]:
        """Figures for summary.json at the end of the run."""
        return {}

    def close(self) -> None:
        """Detach from the model and optimizer (hooks, statistics)."""
        return None


COMPONENTS: dict[str, type[Component]] = {}
"""The built-in components by name, in the order a step runs them."""


def register_component(cls: type[Component]) -> type[Component]:
    """Add ``cls`` to ``COMPONENTS`` under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Component)) or not cls.name:
        raise TypeError(f"{cls!r}: a component is a Component subclass with a non-empty name")
    if COMPONENTS.get(cls.name, cls) is not cls:
        raise ValueError(f"component name {cls.name!r} is taken by {COMPONENTS[cls.name].__qualname__}")
    COMPONENTS[cls.name] = cls
    return cls


def load_component_class(path: str) -> type[Component]:
    """The class named by ``"package.module:ClassName"``; a ValueError with one line for a bad path."""
    module_name, sep, class_name = path.partition(":")
    if not sep or not module_name or not class_name:
        raise ValueError(f"{path!r} is not of the form 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{path!r}: cannot import {module_name!r} ({error})") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"{path!r}: module {module_name!r} has no {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Component)):
        raise ValueError(f"{path!r} is not a component (not a subclass of altgrad.diagnostics.Component)")
    return cls


def build_components(config: RunConfig) -> dict[str, Component]:
    """The registered components the config turns on, then the user's ``diagnostics.callbacks`` (named
    by their path), in the order a step runs them."""
    built = {name: cls.from_config(config) for name, cls in COMPONENTS.items()}
    built |= {path: load_component_class(path).from_config(config) for path in config.diagnostics.callbacks}
    return {name: component for name, component in built.items() if component is not None}


# ---- the built-in diagnostics --------------------------------------------------------------------


@register_component
class GradientStats(Component):
    """``compute_gradient_stats`` of the whole model before clipping, every ``grad_stats_interval``."""

    name = "grad_stats"

    def __init__(self, interval: int = 10) -> None:
        self.interval = interval

    @classmethod
    def from_config(cls, config: RunConfig) -> GradientStats:
        return cls(config.diagnostics.grad_stats_interval)

    def before_step(self, step: int) -> dict[str, float]:
        return compute_gradient_stats(self.run.model) if self.due(step) else {}


def amax_scale(weight: torch.Tensor, fmt: FormatLike) -> torch.Tensor:
    """``amax(|W|) / max_finite`` of ``fmt`` as a float32 tensor (1 for a zero or non-finite amax); no
    host sync."""
    return compute_scale(weight.detach().abs().amax(), fmt)


@register_component
class FlipDiagnostic(Component):
    """Flips, updates and stall per weight through the optimizer's step hooks (``FlipTrackerHooks``).

    Which weights: every QuantizedLinear with a weight format, in its format at its current scale; with
    ``format=``, also every other 2+-dim parameter the optimizer updates, in that format at
    ``amax_scale`` taken before each step. ``interval=None`` counts every optimizer step (a user's loop:
    the hooks stay on); an int hooks the optimizer only for the due steps. ``measure`` pops the counts
    since the previous call (``last_counts``, typed per layer) and returns their metric keys.
    """

    name = "flips"

    def __init__(
        self, format: FormatLike | None = None, interval: int | None = None, predict_stall: bool = True
    ) -> None:
        self.format = None if format is None else get_format(format)
        self.interval = interval
        self.tracker = WeightFlipTracker(predict_stall=predict_stall)
        self.last_counts: dict[str, dict[str, float]] = {}
        self._hooks: FlipTrackerHooks | None = None
        self._layer_of: dict[int, QuantizedLinear] = {}  # id(weight) -> its QuantizedLinear

    @classmethod
    def from_config(cls, config: RunConfig) -> FlipDiagnostic | None:
        return cls(interval=config.diagnostics.flip_interval) if config.diagnostics.flips else None

    def setup(self, run: TrainingRun) -> None:
        super().setup(run)
        # id(parameter) -> (layer name, its (format, scale) now). Named after the QuantizedLinear, not the
        # parameter: a tied lm_head would otherwise be named after the embedding it shares.
        tracked: dict[int, tuple[str, Callable[[], FormatAndScale]]] = {}
        for name, layer in run.tracked().items():
            own = lambda layer=layer: (layer.weight_format, layer.weight_scale())  # noqa: E731
            tracked[id(layer.weight)] = (name, own)
        if self.format is not None:
            fmt = self.format
            for name, p in run.model.named_parameters():
                if p.ndim >= 2 and id(p) not in tracked:
                    tracked[id(p)] = (layer_name(name), lambda p=p: (fmt, amax_scale(p, fmt)))
        self._resolve_tracked = tracked
        self._param_names = {id(p): name for name, p in run.model.named_parameters()}
        # the forward's weight codes (at the scale resolved above) spare the tracker its pre-step encode
        self._layer_of = {id(layer.weight): layer for layer in run.tracked().values()}
        for layer in self._layer_of.values():
            layer.keep_weight_codes = True
        if self.interval is None and run.optimizer is not None:
            self._hooks = self.hook(run.optimizer)

    def hook(self, optimizer: Any) -> FlipTrackerHooks:
        """The tracker on ``optimizer``'s step hooks for the tracked weights it updates (module order)."""
        optimizer = torch_optimizer(optimizer)
        updated = {id(p) for group in optimizer.param_groups for p in group["params"] if p.requires_grad}
        by_id = {id(p): p for group in optimizer.param_groups for p in group["params"]}
        parameters = [
            (layer, self._param_names[key], by_id[key])
            for key, (layer, _) in self._resolve_tracked.items()
            if key in updated
        ]
        resolve = lambda name, p: self._resolve_tracked[id(p)][1]()  # noqa: E731
        return FlipTrackerHooks(self.tracker, optimizer, parameters, resolve, codes=self._forward_codes)

    def _forward_codes(self, parameter: torch.nn.Parameter) -> torch.Tensor | None:
        layer = self._layer_of.get(id(parameter))
        return layer.take_weight_codes() if layer is not None else None

    @property
    def tracks_anything(self) -> bool:
        return bool(self._resolve_tracked)

    def due(self, step: int) -> bool:
        return self.tracks_anything and super().due(step)

    def start_step(self, step: int) -> None:
        if self.interval is not None:  # the forward keeps weight codes only for a step that counts flips
            for layer in self._layer_of.values():
                layer.keep_weight_codes = self.due(step)

    def before_step(self, step: int) -> dict[str, float]:
        if self.interval is not None and self.due(step):  # snapshot and count inside optimizer.step()
            self._hooks = self.hook(self.run.optimizer)
        return {}

    def after_step(self, step: int) -> dict[str, float]:
        if self.interval is not None and self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        return {}

    def measure(self, step: int) -> dict[str, float]:
        if self.interval is not None and not self.due(step):
            return {}
        self.last_counts = self.tracker.pop_step_counts()
        return self.tracker.step_metrics(self.last_counts)

    def stall_ratios(self) -> dict[str, float]:
        """``{layer: stall ratio}`` of the last ``measure`` (layers with updates)."""
        return {name: c["stall_ratio"] for name, c in self.last_counts.items() if c["updates"] > 0}

    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state)

    def close(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        for layer in self._layer_of.values():
            layer.keep_weight_codes = False


@register_component
class OptimizerStats(Component):
    """``optimizer_statistics`` of the quantized weights after the step, before ``zero_grad``."""

    name = "optimizer_stats"

    def __init__(self, interval: int = 50) -> None:
        self.interval = interval

    @classmethod
    def from_config(cls, config: RunConfig) -> OptimizerStats:
        return cls(config.diagnostics.optimizer_stats_interval)

    def after_step(self, step: int) -> dict[str, float]:
        weights = {name: layer.weight for name, layer in self.run.tracked().items()}
        if not (weights and self.due(step)):
            return {}
        return optimizer_statistics(self.run.optimizer, self.run.quant_info, weights)


@register_component
class QuantStatsDiagnostic(Component):
    """The QuantizedLinears' statistics of the due training steps (``interval=None``: every forward
    and backward since the previous ``measure``); ``last`` holds the typed ``QuantStats``."""

    name = "quant_stats"

    def __init__(self, interval: int | None = 10) -> None:
        self.interval = interval
        self.last = QuantStats()

    @classmethod
    def from_config(cls, config: RunConfig) -> QuantStatsDiagnostic:
        return cls(config.diagnostics.quant_stats_interval)

    def setup(self, run: TrainingRun) -> None:
        super().setup(run)
        self.layers = run.quantized()
        for layer in self.layers.values():
            layer.read_stats(reset=True)  # drop sums of forwards before training

    def collect(self, on: bool) -> None:
        """Count the statistics of the forwards and backwards that follow."""
        for layer in self.layers.values():
            layer.collect_stats = on

    def start_step(self, step: int) -> None:
        self.collect(self.due(step))

    def measure(self, step: int) -> dict[str, float]:
        if self.interval is not None and not self.due(step):
            self.last = QuantStats()
            return {}
        stats = {name: layer.read_stats() for name, layer in self.layers.items()}
        if self.run.sum_across_ranks is not None and stats:  # fractions weighted by each rank's counts
            summed = self.run.sum_across_ranks(torch.stack(list(stats.values())))
            stats = dict(zip(stats, summed, strict=True))
        self.last = read_quant_stats(stats)
        return self.last.to_record()

    def close(self) -> None:
        self.collect(False)


@register_component
class RankHealth(Component):
    """Ranks of every matrix (``RankHealthMonitor``) at the due logged steps; warnings become
    ``rank_warning`` events. Rank 0 alone computes them under data parallelism."""

    name = "rank_health"

    def __init__(self, interval: int | None = None, monitor: RankHealthMonitor | None = None) -> None:
        self.interval = interval
        self.monitor = monitor if monitor is not None else RankHealthMonitor()

    @classmethod
    def from_config(cls, config: RunConfig) -> RankHealth:
        d = config.diagnostics
        monitor = RankHealthMonitor(
            log_interval=d.rank_interval,
            warn_threshold=d.rank_warn_threshold,
            warmup_checks=d.rank_warmup_checks,
            max_matrix_elements=d.max_rank_matrix_elements,
        )
        return cls(d.rank_interval, monitor)

    def on_log(self, step: int) -> dict[str, float]:
        if (self.interval is not None and not self.due(step)) or not self.run.is_main:
            return {}
        ranks = self.monitor.compute_layer_ranks(self.run.model)
        record = rank_stats(ranks)
        self.monitor.check_warnings(ranks)
        for warning in self.monitor.last_warnings:
            self.run.event(step, "rank_warning", warning["message"], layer=warning["layer"],
                           metric=warning["metric"])  # fmt: skip
        return record

    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state)
