"""The quantization statistics of a logged step, as metric keys: what each QuantizedLinear summed.

Per layer and tensor kind (weight, activation, grad), from the sums in ``QuantizedLinear.quant_stats``:

    overflow_frac  = overflowed / elements         underflow_frac = flushed to zero / elements
    nonfinite_frac = non-finite (before or after quantization) / elements
    rel_error      = sqrt(sum (Q(x) - x)^2 / sum x^2) = ||Q(x) - x|| / ||x||   (finite elements)

Keys ``quant/{stat}/{layer}/{kind}`` per layer and ``quant/{stat}/{kind}`` (mean over the layers that
quantize that kind). A kind no layer quantized gets no key (not a zero).

Example::

    >>> record = quant_stats_record({"h.0.mlp": layer.read_stats()})     # doctest: +SKIP
    >>> record["quant/rel_error/h.0.mlp/weight"]                         # doctest: +SKIP
    0.031
"""

from __future__ import annotations

import torch

from altgrad.integration import STAT_FIELDS, TENSOR_KINDS

STATS: tuple[str, ...] = ("overflow_frac", "underflow_frac", "nonfinite_frac", "rel_error")


def quant_stats_record(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Metric keys from each layer's ``read_stats()`` (kind x STAT_FIELDS sums); one host sync in all."""
    if not stats:
        return {}
    names = list(stats)
    sums = torch.stack([stats[name] for name in names]).double().cpu()  # layer x kind x field
    field = {name: sums[..., i] for i, name in enumerate(STAT_FIELDS)}
    elements = field["total"].clamp(min=1)
    values = {
        "overflow_frac": field["overflow"] / elements,
        "underflow_frac": field["underflow"] / elements,
        "nonfinite_frac": field["nonfinite"] / elements,
        "rel_error": (field["sum_sq_error"] / field["sum_sq"]).sqrt().nan_to_num(0.0),
    }
    record: dict[str, float] = {}
    for k, kind in enumerate(TENSOR_KINDS):
        measured = field["total"][:, k] > 0
        if not bool(measured.any()):
            continue
        for stat in STATS:
            record[f"quant/{stat}/{kind}"] = float(values[stat][measured, k].mean())
            for i, name in enumerate(names):
                if bool(measured[i]):
                    record[f"quant/{stat}/{name}/{kind}"] = float(values[stat][i, k])
    return record
