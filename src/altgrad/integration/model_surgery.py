"""quantize_model: swap a model's nn.Linear layers for QuantizedLinear, by name-glob rules.

The layers swapped are ``nn.Linear`` and Hugging Face's ``transformers.pytorch_utils.Conv1D``
(GPT-2's blocks; its weight is stored ``(in, out)`` and stays so). ``module_filter_fn(module, fqn)``,
as in torchao's ``convert_to_float8_training``, returns False for a layer that must stay as it is.
Every other module holding a 2+-dim weight (an ``nn.Embedding``, a ``Conv2d``, a subclass of
nn.Linear) is left in full precision; ``report.skipped`` lists them, and a warning gives their
count and types when any is not an embedding (embeddings are lookups, not matmuls: expected).

Every Linear gets the default formats; then each rule whose glob matches the module name (fnmatch,
e.g. ``"*.attn.c_proj"``, ``"lm_head"``, ``"transformer.h.0.*"``) overrides the kinds it names, in
order, so later rules win. A format of ``"none"`` keeps that tensor kind in full precision; a layer
left with no format at all stays a plain nn.Linear. Parameters are reused, so tied weights stay tied.
The plan, its rules and the layer specs are defined in quant_spec.py.

Example::

    >>> rules = [QuantRule("*.attn.c_proj", weight="none"), QuantRule("lm_head", weight="bf16")]
    >>> report = quantize_model(model, QuantPlan(weight="E4M3", activation="E4M3", grad="E5M2", rules=rules))
    >>> report.unmatched_rules
    []
    >>> quantize_model(model, plan, module_filter_fn=lambda module, fqn: fqn != "lm_head")  # doctest: +SKIP
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch.nn as nn

from altgrad.quantization.formats import FloatFormat

from .quant_spec import LayerQuantSpec, QuantPlan
from .quantized_linear import QuantizedLinear, is_linear_like

ModuleFilter = Callable[[nn.Module, str], bool]
EXPECTED_UNQUANTIZED = (nn.Embedding,)
"""Weight-bearing modules that are lookups, not matmuls: left in full precision without a warning."""


@dataclass
class SurgeryReport:
    """What quantize_model did: the layers swapped (name -> spec), the rules that matched nothing, and
    the other modules with a 2+-dim weight, left in full precision (name -> type name)."""

    layers: dict[str, LayerQuantSpec] = field(default_factory=dict)
    unmatched_rules: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _has_matrix_weight(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters(recurse=False))


def _warn_skipped(skipped: dict[str, nn.Module]) -> None:
    """One warning naming the count and types of the weight-bearing modules left unquantized."""
    unexpected = [m for m in skipped.values() if not isinstance(m, EXPECTED_UNQUANTIZED)]
    if not unexpected:
        return
    counts = Counter(type(m).__name__ for m in unexpected)
    expected = Counter(type(m).__name__ for m in skipped.values() if isinstance(m, EXPECTED_UNQUANTIZED))
    listed = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    also = ", ".join(f"{n} {kind}" for kind, n in sorted(expected.items()))
    warnings.warn(
        f"quantize_model left {len(unexpected)} weight-bearing modules unquantized ({listed}): only "
        "nn.Linear and transformers Conv1D are swapped"
        + (f"; also left, as expected: {also}" if also else ""),
        stacklevel=3,
    )


def quantize_model(
    model: nn.Module,
    plan: QuantPlan | FloatFormat,
    module_filter_fn: ModuleFilter | None = None,
    *,
    skip_patterns: Iterable[str] = (),
) -> SurgeryReport:
    """Replace Linear (and Conv1D) layers in place according to ``plan``, except those for which
    ``module_filter_fn(module, fqn)`` is False or whose names match a regular expression of
    ``skip_patterns`` (``re.search``); warn about rules that matched nothing and about weight-bearing
    modules of other types (see the module docstring).

    A bare format (the original AltGrad's ``quantize_model(model, fmt)``) quantizes weights only, with
    delayed scaling.
    """
    if isinstance(plan, FloatFormat):
        plan = QuantPlan(weight=plan)
    report = SurgeryReport()
    used_rules: set[int] = set()
    linears, skipped = [], {}
    for name, module in model.named_modules():
        if is_linear_like(module):
            skipped_by_name = any(re.search(pattern, name) for pattern in skip_patterns)
            if not skipped_by_name and (module_filter_fn is None or module_filter_fn(module, name)):
                linears.append((name, module))
        elif not isinstance(module, QuantizedLinear) and _has_matrix_weight(module):
            skipped[name] = module
    report.skipped = {name: type(module).__name__ for name, module in skipped.items()}
    _warn_skipped(skipped)
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
    """Undo quantize_model: every QuantizedLinear back to its nn.Linear (or Conv1D), same Parameters."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            _set_submodule(model, name, module.to_linear())


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """The model's QuantizedLinear modules by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
