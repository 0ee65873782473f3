"""Quantization specs: how each tensor is quantized, per layer, per model (torchao's ``CastConfig`` and
``Float8LinearConfig`` in spirit).

From one tensor up to a model::

    TensorQuantSpec   one tensor: its format (None: full precision) and the QuantSettings below
    LayerQuantSpec    one linear layer: a format per tensor kind (weight, activation, grad) and the
                      settings the three share; ``tensor(kind)`` is the TensorQuantSpec of one kind
    QuantPlan         a model: the default formats and settings, and name-glob rules overriding formats

``QuantSettings`` are the scale and rounding settings, defined once: ``scaling`` (delayed, current,
per_channel, rowwise, mx; see quantized_linear.py), ``rounding``, ``amax_history``,
``amax_compute_algo``, ``margin``, ``power_of_two_scales``, ``mx_scale_rounding``.

The one per-kind rule, stated here and nowhere else (``LayerQuantSpec.tensor``): a ``per_channel``
layer scales its weight per output row, and its activation and gradient per tensor at their current
amax (``current``). Every other setting applies to the three kinds alike.

A run config's ``quant`` section holds a QuantPlan's fields under the same names
(``QuantPlan.from_dict``). Format names go through ``parse_format``: ``None``, ``"none"``, ``"fp32"``
and ``""`` are full precision. A rule's kind left ``"unset"`` (``UNSET``) keeps the format it had.
Every bad value is a one-line ``ValueError`` naming the field.

Example::

    >>> plan = QuantPlan(weight="E4M3", activation="E4M3", grad="E5M2", scaling="per_channel",
    ...                  rules=[QuantRule("lm_head", weight="none")])
    >>> spec, matched = plan.spec_for("transformer.h.0.mlp.c_fc")
    >>> spec.tensor("weight").scaling, spec.tensor("activation").scaling
    ('per_channel', 'current')
    >>> plan.spec_for("lm_head")[0].weight is None
    True
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from altgrad.quantization.formats import FloatFormat, parse_format
from altgrad.quantization.scaling import AMAX_COMPUTE_ALGOS, MX_ROUNDINGS

TENSOR_KINDS: tuple[str, ...] = ("weight", "activation", "grad")
SCALING_MODES: tuple[str, ...] = ("delayed", "current", "per_channel", "rowwise", "mx")
"""Every mode sets the scale from the amax relative to the format's range, so each absorbs the power-of-two
factor between two formats of one grid (``formats.grid_key``)."""
ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic")
UNSET = "unset"
"""A rule's value for a tensor kind it does not override."""

FormatName = str | FloatFormat | None


@dataclass(frozen=True, kw_only=True)
class QuantSettings:
    """How scales are chosen and values rounded; the same for every tensor kind of a layer."""

    scaling: str = "delayed"
    rounding: str = "nearest"
    amax_history: int = 16
    amax_compute_algo: str = "max"
    margin: int = 0
    power_of_two_scales: bool = False
    mx_scale_rounding: str = "floor"

    def __post_init__(self) -> None:
        choices = {
            "scaling": SCALING_MODES,
            "rounding": ROUNDINGS,
            "amax_compute_algo": AMAX_COMPUTE_ALGOS,
            "mx_scale_rounding": MX_ROUNDINGS,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}: {getattr(self, key)!r} is not one of {allowed}")
        for key, low in (("amax_history", 1), ("margin", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key}: must be an int >= {low}, got {value!r}")
        if not isinstance(self.power_of_two_scales, bool):
            raise ValueError(f"power_of_two_scales: must be true or false, got {self.power_of_two_scales!r}")

    def settings(self) -> dict[str, Any]:
        """The QuantSettings fields of this spec by name."""
        return {f.name: getattr(self, f.name) for f in fields(QuantSettings)}


def _parse_formats(spec: Any, names: Iterable[str]) -> None:
    """Replace each named field of a frozen spec by its parsed format; a bad name names its field."""
    for name in names:
        try:
            object.__setattr__(spec, name, parse_format(getattr(spec, name)))
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None


@dataclass(frozen=True, kw_only=True)
class TensorQuantSpec(QuantSettings):
    """How one tensor is fake-quantized, ``Q(x / s) * s``: its format and its settings.

    ``scaling`` as for a layer, except that ``per_channel`` here means one scale per index of the
    first axis (a weight's output rows) for whatever tensor this is.
    """

    format: FloatFormat | None = None

    def __post_init__(self) -> None:
        _parse_formats(self, ["format"])
        super().__post_init__()


@dataclass(frozen=True)
class LayerQuantSpec(QuantSettings):
    """What one layer quantizes: a format (None: full precision) per tensor kind, and the settings."""

    weight: FloatFormat | None = None
    activation: FloatFormat | None = None
    grad: FloatFormat | None = None

    def __post_init__(self) -> None:
        _parse_formats(self, TENSOR_KINDS)
        super().__post_init__()

    def format_of(self, kind: str) -> FloatFormat | None:
        if kind not in TENSOR_KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {TENSOR_KINDS}")
        return getattr(self, kind)

    def tensor(self, kind: str) -> TensorQuantSpec:
        """The spec ``kind`` is quantized with: the layer's, except that under ``per_channel`` only the
        weight is scaled per channel; the activation and the gradient are scaled per tensor at their
        current amax (``current``)."""
        settings = self.settings()
        if self.scaling == "per_channel" and kind != "weight":
            settings["scaling"] = "current"
        return TensorQuantSpec(format=self.format_of(kind), **settings)

    @property
    def is_active(self) -> bool:
        return any(self.format_of(kind) is not None for kind in TENSOR_KINDS)


@dataclass(frozen=True)
class QuantRule:
    """Formats for the modules whose names match ``pattern`` (fnmatch); a kind left ``UNSET`` keeps
    the format it had."""

    pattern: str
    weight: FormatName = UNSET
    activation: FormatName = UNSET
    grad: FormatName = UNSET

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"pattern: expected a non-empty module-name glob, got {self.pattern!r}")
        _parse_formats(self, [kind for kind in TENSOR_KINDS if getattr(self, kind) != UNSET])

    def overrides(self) -> dict[str, FloatFormat | None]:
        """The formats this rule sets, by tensor kind."""
        return {kind: value for kind in TENSOR_KINDS if (value := getattr(self, kind)) != UNSET}


@dataclass(frozen=True)
class QuantPlan(QuantSettings):
    """Default formats for every Linear, the rules on top (later rules win), and the settings.

    ``QuantPlan.from_dict`` reads a run config's ``quant`` keys; ``spec_for(name)`` is the spec of one
    layer."""

    weight: FormatName = None
    activation: FormatName = None
    grad: FormatName = None
    rules: tuple[QuantRule, ...] | list[QuantRule] = ()

    def __post_init__(self) -> None:
        _parse_formats(self, TENSOR_KINDS)
        object.__setattr__(self, "rules", tuple(self.rules))
        for index, rule in enumerate(self.rules):
            if not isinstance(rule, QuantRule):
                raise ValueError(f"rules[{index}]: expected a QuantRule, got {type(rule).__name__}")
        super().__post_init__()

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]) -> QuantPlan:
        """The plan of a ``quant`` config section (``enabled``, ``recipe`` and ``compiled_kernels`` are
        no part of a plan: the recipe is expanded into the other keys when the config is read, and
        compiled kernels change how the values are computed, not what they are)."""
        skipped = ("enabled", "recipe", "compiled_kernels")
        values = {key: value for key, value in section.items() if key not in skipped}
        rules = [QuantRule(**rule) for rule in values.pop("rules", ())]
        return cls(**values, rules=rules)

    def spec_for(self, module_name: str) -> tuple[LayerQuantSpec, list[int]]:
        """The layer's spec and the indices of the rules that matched it."""
        formats = {kind: getattr(self, kind) for kind in TENSOR_KINDS}
        matched = []
        for index, rule in enumerate(self.rules):
            if fnmatch.fnmatchcase(module_name, rule.pattern):
                formats.update(rule.overrides())
                matched.append(index)
        return LayerQuantSpec(**formats, **self.settings()), matched

    def formats(self) -> list[FloatFormat]:
        """Every format a tensor of some layer can get from this plan, in order of first mention."""
        named = [getattr(self, kind) for kind in TENSOR_KINDS]
        named += [fmt for rule in self.rules for fmt in rule.overrides().values()]
        return [fmt for fmt in dict.fromkeys(named) if fmt is not None]
