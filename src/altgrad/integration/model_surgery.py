"""quantize_model: swap a model's nn.Linear layers for QuantizedLinear, by name-glob rules.

Every Linear gets the default formats; then each rule whose glob matches the module name (fnmatch,
e.g. ``"*.attn.c_proj"``, ``"lm_head"``, ``"transformer.h.0.*"``) overrides the kinds it names, in
order, so later rules win. A format of ``"none"`` keeps that tensor kind in full precision; a layer
left with no format at all stays a plain nn.Linear. Parameters are reused, so tied weights stay tied.

Example::

    >>> rules = [QuantRule("*.attn.c_proj", weight="none"), QuantRule("lm_head", weight="bf16")]
    >>> report = quantize_model(model, QuantPlan(weight="E4M3", activation="E4M3", grad="E5M2", rules=rules))
    >>> report.unmatched_rules
    []
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch.nn as nn

from altgrad.quantization.formats import FloatFormat, get_format

from .quantized_linear import TENSOR_KINDS, LayerQuantSpec, QuantizedLinear

FormatName = str | FloatFormat | None


def resolve_format(name: FormatName) -> FloatFormat | None:
    """A format, or None for ``None`` / ``"none"`` / ``"fp32"`` (full precision)."""
    if name is None or (isinstance(name, str) and name.strip().lower() in ("none", "fp32", "")):
        return None
    return get_format(name)


@dataclass(frozen=True)
class QuantRule:
    """Formats for the modules whose names match ``pattern``; a kind left unset is not overridden."""

    pattern: str
    weight: FormatName | str = "unset"
    activation: FormatName | str = "unset"
    grad: FormatName | str = "unset"

    def overrides(self) -> dict[str, FloatFormat | None]:
        return {
            kind: resolve_format(value) for kind in TENSOR_KINDS if (value := getattr(self, kind)) != "unset"
        }


@dataclass(frozen=True)
class QuantPlan:
    """Default formats for every Linear, the rules on top, and how scales and rounding work."""

    weight: FormatName = None
    activation: FormatName = None
    grad: FormatName = None
    rules: tuple[QuantRule, ...] | list[QuantRule] = ()
    scaling: str = "delayed"
    rounding: str = "nearest"
    amax_history: int = 16
    margin: int = 0

    def spec_for(self, module_name: str) -> tuple[LayerQuantSpec, list[int]]:
        """The layer's spec and the indices of the rules that matched it."""
        formats = {kind: resolve_format(getattr(self, kind)) for kind in TENSOR_KINDS}
        matched = []
        for index, rule in enumerate(self.rules):
            if fnmatch.fnmatchcase(module_name, rule.pattern):
                formats.update(rule.overrides())
                matched.append(index)
        spec = LayerQuantSpec(
            **formats,
            scaling=self.scaling,
            rounding=self.rounding,
            amax_history=self.amax_history,
            margin=self.margin,
        )
        return spec, matched


@dataclass
class SurgeryReport:
    """What quantize_model did: the layers swapped (name -> spec) and the rules that matched nothing."""

    layers: dict[str, LayerQuantSpec] = field(default_factory=dict)
    unmatched_rules: list[str] = field(default_factory=list)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_model(
    model: nn.Module, plan: QuantPlan | FloatFormat, *, skip_patterns: Iterable[str] = ()
) -> SurgeryReport:
    """Replace Linear layers in place according to ``plan``; warn about rules that matched nothing.

    A bare format (the original AltGrad's ``quantize_model(model, fmt)``) quantizes weights only, with
    delayed scaling. Linears whose names match a regular expression of ``skip_patterns`` (``re.search``)
    stay full precision.
    """
    if isinstance(plan, FloatFormat):
        plan = QuantPlan(weight=plan)
    report = SurgeryReport()
    used_rules: set[int] = set()
    linears = [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is nn.Linear and not any(re.search(pattern, name) for pattern in skip_patterns)
    ]
    for name, linear in linears:
        spec, matched = plan.spec_for(name)
        used_rules.update(matched)
        if spec.is_active:
            _set_submodule(model, name, QuantizedLinear(linear, spec))
            report.layers[name] = spec
    for index, rule in enumerate(plan.rules):
        if index not in used_rules:
            report.unmatched_rules.append(rule.pattern)
            warnings.warn(f"quant rule {rule.pattern!r} matched no Linear layer", stacklevel=2)
    return report


def dequantize_model(model: nn.Module) -> None:
    """Undo quantize_model: every QuantizedLinear back to an nn.Linear with the same Parameters."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            _set_submodule(model, name, module.to_linear())


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """The model's QuantizedLinear modules by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
