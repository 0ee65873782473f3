"""Named quantization recipes: the settings other fp8 training stacks use, as altgrad quant keys.

A recipe is a dict of ``quant`` keys (also ``QuantPlan`` fields). In a run config,
``quant.recipe: NAME`` fills in every key of the recipe the user did not give; keys given
explicitly win. The expansions:

=====================  ======  ==========  =====  ===========  ==========================================
recipe                 weight  activation  grad   scaling      other keys
=====================  ======  ==========  =====  ===========  ==========================================
``te_hybrid_delayed``  E4M3    E4M3        E5M2   delayed      amax_history 1024, amax_compute_algo max,
                                                               margin 0 (Transformer Engine's
                                                               ``DelayedScaling`` defaults, HYBRID format)
``torchao_tensorwise`` E4M3    E4M3        E5M2   current      (torchao ``Float8LinearConfig()``:
                                                               dynamic per-tensor scales)
``torchao_rowwise``    E4M3    E4M3        E4M3   rowwise      power_of_two_scales true (torchao's
                                                               ``ROWWISE`` recipe)
``mxfp8``              E4M3    E4M3        E4M3   mx           mx_scale_rounding ceil (= RCEIL; blocks
                                                               of 32 sharing an E8M0 scale)
=====================  ======  ==========  =====  ===========  ==========================================

Where altgrad differs from the stack it names: torchao's rowwise backward re-scales each operand
along the GEMM's reduction axis (the weight per column for the input gradient, input and output
gradient per column for the weight gradient); altgrad's backward reuses the forward's quantized
weight and the input quantized per row.

Example::

    >>> QuantPlan(**QUANT_RECIPES["torchao_tensorwise"])  # doctest: +SKIP
    >>> expand_recipe({"recipe": "mxfp8", "grad": "E5M2"})["grad"]
    'E5M2'
"""

from __future__ import annotations

from typing import Any

QUANT_RECIPES: dict[str, dict[str, Any]] = {
    "te_hybrid_delayed": {
        "weight": "E4M3",
        "activation": "E4M3",
        "grad": "E5M2",
        "scaling": "delayed",
        "amax_history": 1024,
        "amax_compute_algo": "max",
        "margin": 0,
    },
    "torchao_tensorwise": {
        "weight": "E4M3",
        "activation": "E4M3",
        "grad": "E5M2",
        "scaling": "current",
        "power_of_two_scales": False,
    },
    "torchao_rowwise": {
        "weight": "E4M3",
        "activation": "E4M3",
        "grad": "E4M3",
        "scaling": "rowwise",
        "power_of_two_scales": True,
    },
    "mxfp8": {
        "weight": "E4M3",
        "activation": "E4M3",
        "grad": "E4M3",
        "scaling": "mx",
        "mx_scale_rounding": "ceil",
    },
}


def expand_recipe(section: dict[str, Any]) -> dict[str, Any]:
    """The ``quant`` section with its ``recipe``'s keys filled in where the user gave none."""
    name = section.get("recipe")
    if name is None:
        return section
    if name not in QUANT_RECIPES:
        raise ValueError(f"unknown recipe {name!r}; allowed: {', '.join(QUANT_RECIPES)}")
    return {**QUANT_RECIPES[name], **section}
