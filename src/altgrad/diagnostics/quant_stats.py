"""The quantization statistics of a logged step: what each QuantizedLinear summed, as named fields.

Per layer and tensor kind (weight, activation, grad), from the sums in ``QuantizedLinear.quant_stats``
(rows ``TENSOR_KINDS``, columns ``STAT_FIELDS``):

    overflow_frac  = overflowed / elements         underflow_frac = flushed to zero / elements
    nonfinite_frac = non-finite (before or after quantization) / elements
    rel_error      = sqrt(sum (Q(x) - x)^2 / sum x^2) = ||Q(x) - x|| / ||x||   (finite elements)

``read_quant_stats`` gives a ``QuantStats``: ``.layers[layer][kind]`` and ``.means[kind]`` (mean over the
layers that quantize that kind) are ``TensorStats`` with those four fields; ``to_record()`` writes the
keys ``quant/{stat}/{layer}/{kind}`` and ``quant/{stat}/{kind}``. A kind no layer quantized gets no
entry (not a zero).

Example::

    >>> stats = read_quant_stats({"h.0.mlp": layer.read_stats()})    # doctest: +SKIP
    >>> stats.layers["h.0.mlp"]["weight"].rel_error                  # doctest: +SKIP
    0.031
    >>> stats.to_record()["quant/rel_error/h.0.mlp/weight"]          # doctest: +SKIP
    0.031
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from altgrad.integration import STAT_FIELDS, TENSOR_KINDS
from altgrad.record import quant_key


@dataclass(frozen=True)
class TensorStats:
    """The four statistics of one quantized tensor kind (fractions of its elements; rel_error a ratio)."""

    overflow_frac: float
    underflow_frac: float
    nonfinite_frac: float
    rel_error: float


STATS: tuple[str, ...] = tuple(f.name for f in fields(TensorStats))


@dataclass
class QuantStats:
    """``layers[layer][kind]`` per layer and ``means[kind]`` over layers; empty when nothing was measured."""

    layers: dict[str, dict[str, TensorStats]] = field(default_factory=dict)
    means: dict[str, TensorStats] = field(default_factory=dict)

    def nonfinite_fracs(self, kind: str) -> dict[str, float]:
        """``{layer: nonfinite_frac}`` of ``kind`` for the layers that quantized it."""
        return {name: kinds[kind].nonfinite_frac for name, kinds in self.layers.items() if kind in kinds}

    def to_record(self) -> dict[str, float]:
        """The run folder's ``quant/...`` keys."""
        record: dict[str, float] = {}
        for kind, mean in self.means.items():
            for stat in STATS:
                record[quant_key(stat, kind)] = getattr(mean, stat)
                for name, kinds in self.layers.items():
                    if kind in kinds:
                        record[quant_key(stat, kind, name)] = getattr(kinds[kind], stat)
        return record


def read_quant_stats(stats: dict[str, torch.Tensor]) -> QuantStats:
    """``QuantStats`` from each layer's ``read_stats()`` (kind x STAT_FIELDS sums); one host sync in all."""
    if not stats:
        return QuantStats()
    names = list(stats)
    sums = torch.stack([stats[name] for name in names]).double().cpu()  # layer x kind x field
    column = {name: sums[..., i] for i, name in enumerate(STAT_FIELDS)}
    elements = column["total"].clamp(min=1)
    values = {
        "overflow_frac": column["overflow"] / elements,
        "underflow_frac": column["underflow"] / elements,
        "nonfinite_frac": column["nonfinite"] / elements,
        "rel_error": (column["sum_sq_error"] / column["sum_sq"]).sqrt().nan_to_num(0.0),
    }
    result = QuantStats()
    for k, kind in enumerate(TENSOR_KINDS):
        measured = column["total"][:, k] > 0
        if not bool(measured.any()):
            continue
        result.means[kind] = TensorStats(**{stat: float(values[stat][measured, k].mean()) for stat in STATS})
        for i, name in enumerate(names):
            if bool(measured[i]):
                stat_values = {stat: float(values[stat][i, k]) for stat in STATS}
                result.layers.setdefault(name, {})[kind] = TensorStats(**stat_values)
    return result


def quant_stats_record(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """``read_quant_stats(stats).to_record()``: the metric keys; one host sync in all."""
    return read_quant_stats(stats).to_record()
