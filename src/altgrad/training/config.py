"""Run configuration: a YAML file validated on load, with ``--set key.path=value`` overrides.

Every section is a strict schema: an unknown or mistyped key, a bad format name or a wrong type is
a ``ConfigError`` naming the key and the allowed values. ``load_config(None)`` is the built-in
default (``altgrad/configs/default.yaml``).

Example::

    >>> config = load_config(None, overrides=["quant.weight=E3M4", "train.max_steps=50"])
    >>> config.quant.weight, config.train.max_steps
    ('E3M4', 50)
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from altgrad.integration.quant_spec import UNSET, QuantPlan
from altgrad.integration.recipes import expand_recipe
from altgrad.jsonio import write_text_atomic
from altgrad.quantization.formats import FORMATS, parse_format
from altgrad.training.optimizer import OPTIMIZERS


class ConfigError(ValueError):
    """A configuration problem a user caused; the message names the key and the allowed values."""


def _check_format(value: str | None) -> str | None:
    """The name as given, ``"none"`` for a name of full precision (``parse_format``), None for None."""
    try:
        fmt = parse_format(value)
    except ValueError:
        allowed = f"none, {', '.join(FORMATS)} or a spec like e3m4:bias=1"
        raise ValueError(f"unknown format {value!r}; allowed: {allowed}") from None
    return value if fmt is not None or value is None else "none"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """``source: hf`` (with ``hf_config``) and ``factory`` build other models: see training/models.py."""

    source: Literal["altgrad", "hf"] = "altgrad"
    hf_config: str | None = None
    factory: str | None = None
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(128, ge=1)
    block_size: int = Field(128, ge=2)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = False

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.source == "hf" and self.hf_config is None:
            raise ValueError("source 'hf' needs hf_config, a local config.json (or the folder holding it)")
        if self.source == "hf" and self.factory is not None:
            raise ValueError("give either source 'hf' (with hf_config) or factory, not both")
        return self


class DataConfig(_Section):
    source: Literal["shakespeare", "text", "hf"] = "shakespeare"
    tokenizer: Literal["char", "byte", "bpe", "hf"] = "char"
    path: str | None = None
    bpe_path: str | None = None
    hf_tokenizer: str | None = None
    hf_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)


class TrainConfig(_Section):
    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    eval_interval: int = Field(50, ge=1)
    eval_batches: int = Field(10, ge=1)
    log_interval: int = Field(1, ge=1)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # see altgrad/training/device.py
    compile: bool = False  # torch.compile the training step's model: see altgrad/training/compile.py


class OptimizerConfig(_Section):
    """``lr`` is in the optimizer's own unit (``optimizer.lr_default``): weight units for adamw, sgd
    and manifold_adamw's grad_scale (default ``train.lr``), ULPs for manifold_adamw's ulp_step and
    rungs for grid (default 1.0), natural-log units of |w| for madam (default 0.01). Weight decay
    (``train.weight_decay``) is decoupled and in weight units for every optimizer, at ``train.lr``
    (and the parameters without a format of the grid-aware optimizers train at ``train.lr``). The
    warmup/cosine schedule shape of ``train`` applies to both. ``weight_storage``: none/fp32 (an fp32
    master copy), ``quantized`` (each weight stored in its layer's forward format at its current
    scale) or a format name (every weight stored in it at scale 1)."""

    name: str = "adamw"  # a key of altgrad.training.optimizer.OPTIMIZERS
    lr: float | None = Field(None, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    manifold_mode: Literal["ulp_step", "grad_scale"] = "ulp_step"
    rung_clip: float = Field(4.0, gt=0)
    weight_storage: str | None = None
    storage_rounding: Literal["nearest", "stochastic"] = "nearest"
    kahan: bool = False

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in OPTIMIZERS:
            raise ValueError(f"got {value!r}; allowed: {', '.join(OPTIMIZERS)}")
        return value

    @field_validator("weight_storage")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        return value if value == "quantized" else _check_format(value)

    def lr_default(self, train_lr: float) -> float:
        """Peak learning rate in the optimizer's own unit: ``lr`` if set, else its registry entry's
        default for the unit (``train.lr`` for weight units)."""
        if self.lr is not None:
            return self.lr
        _, default = OPTIMIZERS[self.name].unit(self.manifold_mode)
        return train_lr if default is None else default


class QuantRuleConfig(_Section):
    pattern: str
    weight: str | None = UNSET
    activation: str | None = UNSET
    grad: str | None = UNSET

    @field_validator("weight", "activation", "grad")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        return value if value == UNSET else _check_format(value)


class QuantConfig(_Section):
    """A ``QuantPlan``'s fields (integration/quant_spec.py) and ``enabled``; ``recipe`` fills in the keys
    of a named preset the user did not give (integration/recipes.py)."""

    enabled: bool = True
    recipe: str | None = None
    weight: str | None = "E4M3"
    activation: str | None = "E4M3"
    grad: str | None = "E5M2"
    scaling: Literal["delayed", "current", "per_channel", "rowwise", "mx"] = "delayed"
    rounding: Literal["nearest", "stochastic"] = "nearest"
    amax_history: int = Field(16, ge=1)
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    margin: int = Field(0, ge=0)
    power_of_two_scales: bool = False
    mx_scale_rounding: Literal["floor", "ceil", "even"] = "floor"
    rules: list[QuantRuleConfig] = Field(default_factory=list)
    compiled_kernels: bool = True  # how, not what: QuantizedLinear.compiled_kernels (the same bits)

    @model_validator(mode="before")
    @classmethod
    def _expand_recipe(cls, data: Any) -> Any:
        return expand_recipe(data) if isinstance(data, dict) else data

    @field_validator("weight", "activation", "grad")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        return _check_format(value)

    @model_validator(mode="after")
    def _a_valid_plan(self) -> QuantConfig:
        self.plan()  # what the schema cannot see (an empty rule pattern) is an error now, not at the run
        return self

    def plan(self) -> QuantPlan:
        """The QuantPlan these keys describe (what ``quantize_model`` applies when ``enabled``)."""
        return QuantPlan.from_dict(self.model_dump())


class DiagnosticsConfig(_Section):
    flips: bool = True
    flip_interval: int = Field(1, ge=1)
    rank_interval: int = Field(50, ge=1)
    grad_stats_interval: int = Field(10, ge=1)
    quant_stats_interval: int = Field(10, ge=1)
    optimizer_stats_interval: int = Field(50, ge=1)
    rank_warn_threshold: float = Field(0.3, gt=0, lt=1)
    rank_warmup_checks: int = Field(3, ge=1)
    max_rank_matrix_elements: int = Field(4_000_000, ge=1)
    callbacks: list[str] = Field(default_factory=list)  # user components, "package.module:ClassName"

    @field_validator("callbacks")
    @classmethod
    def _loadable(cls, paths: list[str]) -> list[str]:
        from altgrad.diagnostics.components import load_component_class  # imports the model stack

        for path in paths:
            load_component_class(path)
        return paths


class StabilityConfig(_Section):
    relative_grad_clip: float | None = Field(None, gt=0)
    format_shift: bool = False
    shift_patience: int = Field(20, ge=1)
    shift_stall_threshold: float = Field(0.98, gt=0, le=1)
    shift_warmup_steps: int = Field(50, ge=0)


class LoggingConfig(_Section):
    jsonl: bool = True
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    wandb_project: str = "altgrad"
    wandb_group: str | None = None  # a matrix sets its name here and each cell's settings as tags
    wandb_tags: list[str] = Field(default_factory=list)
    tensorboard: bool = False
    progress: bool = True


class CheckpointConfig(_Section):
    interval: int = Field(100, ge=1)
    keep: int = Field(2, ge=1)


class RunConfig(_Section):
    name: str = "default"
    seed: int = 0
    out_dir: str = "runs"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig)
    stability: StabilityConfig = Field(default_factory=StabilityConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @property
    def optimizer_lr(self) -> float:
        """Peak learning rate of the optimizer, in its own unit (see OptimizerConfig)."""
        return self.optimizer.lr_default(self.train.lr)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _section_at(path: tuple[Any, ...]) -> type[BaseModel]:
    """The schema class at a validation error's location (list indices skipped)."""
    section: type[BaseModel] = RunConfig
    for part in path:
        if isinstance(part, str) and part in section.model_fields:
            annotation = section.model_fields[part].annotation
            candidates = [annotation, *getattr(annotation, "__args__", ())]
            section = next(c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel))
    return section


def _describe(error: ValidationError) -> str:
    """One line per problem: the dotted key, what is wrong, and what is allowed."""
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            allowed = ", ".join(_section_at(problem["loc"][:-1]).model_fields)
            message = f"unknown key; allowed keys here: {allowed}"
        elif problem["type"] == "literal_error":
            message = f"got {problem.get('input')!r}; {message}"
        lines.append(f"config key '{key}': {message}")
    return "; ".join(lines)


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)``, or a one-line ConfigError: ``source:line:column: problem``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None


def read_yaml(path: str | Path) -> Any:
    """A YAML file's contents; a missing file or a syntax error is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    return parse_yaml(path.read_text(), str(path))


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` -> (["train", "lr"], 0.001); values are parsed as YAML scalars/lists."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key.path=value")
    return key.strip().split("."), parse_yaml(raw, f"override {item!r}") if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``key.path=value`` in a nested dict (unknown keys are caught by validation)."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def default_config_path() -> Path:
    return Path(str(importlib.resources.files("altgrad") / "configs" / "default.yaml"))


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Validate a nested dict into a RunConfig, or raise ConfigError naming every bad key."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (None: the built-in default), apply overrides, validate."""
    source = default_config_path() if path is None else Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"config file not found: {source}")
    data = parse_yaml(source.read_text(), str(source)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {source}: the top level must be a mapping of sections")
    return config_from_dict(apply_overrides(data, overrides or []))


def save_config(config: RunConfig, path: str | Path) -> None:
    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))  # a resume rewrites it
