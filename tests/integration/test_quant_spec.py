"""The quantization spec: YAML, Python and the old copy chain give the same layer settings; "no format"
is one thing however spelled; the per-kind rule; bad specs are one-line errors.

The reference for "the old chain" is ``_old_chain``, the field-by-field copy the trainer and
``QuantPlan.spec_for`` made before the spec existed (commit 592a9d3), transcribed here.
"""

from __future__ import annotations

import fnmatch
import itertools

import pytest
import torch
import torch.nn as nn
import yaml

from altgrad.integration import (
    TENSOR_KINDS,
    LayerQuantSpec,
    QuantizedLinear,
    QuantPlan,
    QuantRule,
    TensorQuantSpec,
)
from altgrad.quantization.formats import E4M3, E5M2, get_format
from altgrad.training.config import ConfigError, load_config
from altgrad.training.trainer import format_width_warnings

SETTINGS = {
    "scaling": "delayed", "rounding": "nearest", "amax_history": 16, "amax_compute_algo": "max", "margin": 0,
    "power_of_two_scales": False, "mx_scale_rounding": "floor",
}  # fmt: skip
NO_FORMAT_SPELLINGS = ["none", "NONE", "fp32", "FP32", " none "]


def _old_chain(quant: dict, module_name: str) -> dict:
    """The layer settings the old chain produced: QuantConfig fields copied into a QuantPlan, resolved
    (None/"none"/"fp32"/"" -> None), rules applied in order ("unset" kinds kept), copied into the spec."""

    def resolve(name):
        if name is None or (isinstance(name, str) and name.strip().lower() in ("none", "fp32", "")):
            return None
        return get_format(name)

    formats = {kind: resolve(quant.get(kind)) for kind in TENSOR_KINDS}
    for rule in quant.get("rules", []):
        if fnmatch.fnmatchcase(module_name, rule["pattern"]):
            formats.update({k: resolve(v) for k in TENSOR_KINDS if (v := rule.get(k, "unset")) != "unset"})
    return {**formats, **{key: quant.get(key, default) for key, default in SETTINGS.items()}}


def _as_dict(spec: LayerQuantSpec) -> dict:
    return {kind: spec.format_of(kind) for kind in TENSOR_KINDS} | spec.settings()


RULE_SETS = {
    "none": [],
    "mlp_e3m4": [{"pattern": "*.mlp.*", "weight": "E3M4", "activation": "E3M4"}],
    "layered": [
        {"pattern": "transformer.h.*", "weight": "bfloat16", "grad": "none"},
        {"pattern": "transformer.h.1.*", "weight": "e3m4:bias=1"},
        {"pattern": "lm_head", "activation": "fp32"},
    ],
}
FORMAT_TRIPLES = [
    ("E4M3", "E4M3", "E5M2"), ("E3M4", "none", "E5M2"), ("none", "E2M5", "none"),
    ("e3m4:bias=1", "E4M3", "E4M3"),
]  # fmt: skip
SETTING_CASES = [
    {},
    {"scaling": "per_channel", "rounding": "stochastic", "margin": 2},
    {"scaling": "mx", "mx_scale_rounding": "ceil"},
    {
        "scaling": "rowwise",
        "power_of_two_scales": True,
        "amax_history": 4,
        "amax_compute_algo": "most_recent",
    },
    {"scaling": "current"},
]
LAYERS = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "transformer.h.0.mlp.c_proj", "lm_head"]


@pytest.mark.parametrize("rules", list(RULE_SETS))
@pytest.mark.parametrize("settings", range(len(SETTING_CASES)))
def test_yaml_python_and_old_chain_give_the_same_layer_specs(rules, settings, tmp_path):
    for weight, activation, grad in FORMAT_TRIPLES:
        quant = {"weight": weight, "activation": activation, "grad": grad, "rules": RULE_SETS[rules]}
        quant |= SETTING_CASES[settings]
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump({"quant": quant}))
        from_yaml = load_config(path).quant.plan()
        python_rules = [QuantRule(**rule) for rule in quant["rules"]]
        from_python = QuantPlan(**{k: v for k, v in quant.items() if k != "rules"}, rules=python_rules)
        assert from_yaml == from_python
        for name in LAYERS:
            expected = _old_chain(quant, name)
            assert _as_dict(from_yaml.spec_for(name)[0]) == expected, (quant, name)
            assert _as_dict(from_python.spec_for(name)[0]) == expected


def test_overrides_on_the_command_line_give_the_same_plan_as_python():
    overrides = ["quant.weight=E3M4", "quant.scaling=mx", "quant.rules=[{pattern: lm_head, grad: fp32}]"]
    plan = load_config(None, overrides).quant.plan()
    assert plan == QuantPlan(
        weight="E3M4", activation="E4M3", grad="E5M2", scaling="mx", rules=[QuantRule("lm_head", grad=None)]
    )
    assert plan.spec_for("lm_head") == (LayerQuantSpec(get_format("E3M4"), E4M3, None, scaling="mx"), [0])


@pytest.mark.parametrize("spelling", [None, *NO_FORMAT_SPELLINGS])
def test_every_no_format_spelling_means_full_precision_everywhere(spelling):
    assert LayerQuantSpec(weight=spelling).weight is None
    assert TensorQuantSpec(format=spelling).format is None
    assert QuantPlan(weight=spelling).spec_for("x")[0].weight is None
    assert QuantRule("x", weight=spelling).overrides() == {"weight": None}
    assert QuantPlan(weight="E4M3", rules=[QuantRule("x", weight=spelling)]).spec_for("x")[0].weight is None
    value = "null" if spelling is None else repr(spelling)
    config = load_config(None, [f"quant.grad={value}", f"quant.rules=[{{pattern: x, weight: {value}}}]"])
    assert config.quant.plan().grad is None and config.quant.plan().spec_for("x")[0].weight is None
    layer = QuantizedLinear(nn.Linear(4, 4), E4M3)
    layer.set_format("weight", spelling)
    assert layer.weight_format is None and layer.quantizers["weight"].format is None


def test_a_rule_kind_left_unset_keeps_the_default_and_is_no_format():
    plan = QuantPlan(
        weight="E4M3", activation="E4M3", grad="E5M2", rules=[QuantRule("*.mlp.*", weight="E3M4")]
    )
    spec = plan.spec_for("h.mlp.fc")[0]
    assert (spec.weight.name, spec.activation, spec.grad) == ("E3M4", E4M3, E5M2)
    assert [fmt.name for fmt in plan.formats()] == ["E4M3", "E5M2", "E3M4"]


def test_format_width_warnings_read_rules_with_unset_kinds():
    """Before the spec, a rule leaving a kind unset made the trainer look up a format named 'unset'."""
    config = load_config(None, ["quant.rules=[{pattern: '*.mlp.*', weight: E4M4}, {pattern: x, grad: none}]"])
    assert format_width_warnings(config) == [
        "format E4M4 is 9 bits wide, not 8: this run is not an 8-bit experiment"
    ]


# ---- the per-kind rule, explicit in the spec -------------------------------------------------------------

EXPECTED_TENSOR_SCALING = {  # layer scaling -> (weight, activation, grad), as quantized_linear.py says
    "delayed": ("delayed", "delayed", "delayed"),
    "current": ("current", "current", "current"),
    "per_channel": ("per_channel", "current", "current"),
    "rowwise": ("rowwise", "rowwise", "rowwise"),
    "mx": ("mx", "mx", "mx"),
}


@pytest.mark.parametrize("scaling", list(EXPECTED_TENSOR_SCALING))
def test_each_kind_runs_with_its_tensor_spec(scaling):
    spec = LayerQuantSpec(
        weight=E4M3, activation=E4M3, grad=E5M2, scaling=scaling, margin=1, rounding="stochastic"
    )
    layer = QuantizedLinear(nn.Linear(64, 8), spec)
    for kind, expected in zip(TENSOR_KINDS, EXPECTED_TENSOR_SCALING[scaling], strict=True):
        tensor = layer.quantizers[kind].spec
        assert tensor == spec.tensor(kind)
        assert (tensor.format, tensor.scaling, tensor.margin, tensor.rounding) == (
            spec.format_of(kind),
            expected,
            1,
            "stochastic",
        )
    layer.set_format("activation", "E5M2")
    assert (
        layer.quantizers["activation"].spec.format is E5M2 and layer.quantizers["weight"].spec.format is E4M3
    )


def test_per_channel_activation_scale_is_per_tensor_at_the_current_amax():
    """By hand: the activation's scale is amax(|x|) / 448 of this call, one number; the weight's per row."""
    layer = QuantizedLinear(
        nn.Linear(4, 3), LayerQuantSpec(weight=E4M3, activation=E4M3, scaling="per_channel")
    )
    layer(torch.tensor([[1.0, -8.0, 2.0, 0.5]]))
    layer(torch.tensor([[0.5, 0.25, -1.0, 0.0]]))
    assert layer.quantizers["activation"].last_scale.numel() == 1
    assert float(layer.quantizers["activation"].last_scale) == pytest.approx(1.0 / 448.0, rel=1e-7)
    assert layer.weight_scale().shape == (3, 1)


# ---- bad specs are one-line errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LayerQuantSpec(scaling="blockwise"), r"^scaling: 'blockwise' is not one of \("),
        (lambda: LayerQuantSpec(rounding="up"), r"^rounding: 'up' is not one of"),
        (lambda: LayerQuantSpec(amax_compute_algo="mean"), r"^amax_compute_algo: 'mean' is not one of"),
        (lambda: LayerQuantSpec(mx_scale_rounding="round"), r"^mx_scale_rounding: 'round' is not one of"),
        (lambda: LayerQuantSpec(amax_history=0), r"^amax_history: must be an int >= 1, got 0"),
        (lambda: LayerQuantSpec(margin=-1), r"^margin: must be an int >= 0, got -1"),
        (lambda: LayerQuantSpec(margin=1.5), r"^margin: must be an int >= 0, got 1.5"),
        (lambda: LayerQuantSpec(power_of_two_scales="yes"), r"^power_of_two_scales: must be true or false"),
        (lambda: LayerQuantSpec(weight="E9M9"), r"^weight: format spec 'E9M9'"),
        (lambda: LayerQuantSpec(grad="unset"), r"^grad: unknown format 'unset'"),
        (lambda: TensorQuantSpec(format="e4m3x"), r"^format: unknown format 'e4m3x'"),
        (lambda: QuantRule("lm_head", activation="bf17"), r"^activation: unknown format 'bf17'"),
        (lambda: QuantRule(""), r"^pattern: expected a non-empty module-name glob"),
        (lambda: QuantPlan(rules=[{"pattern": "x"}]), r"^rules\[0\]: expected a QuantRule, got dict"),
        (lambda: QuantPlan(scaling="tensorwise"), r"^scaling: 'tensorwise' is not one of"),
        (lambda: LayerQuantSpec().format_of("bias"), r"^kind: 'bias' is not one of"),
    ],
)
def test_a_bad_spec_is_a_one_line_error(build, message):
    with pytest.raises(ValueError, match=message) as error:
        build()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("quant.scaling=blockwise", "config key 'quant.scaling': got 'blockwise'"),
        ("quant.weight=unset", "config key 'quant.weight': unknown format 'unset'"),
        (
            "quant.rules=[{pattern: x, grad: e4m3x}]",
            "config key 'quant.rules.0.grad': unknown format 'e4m3x'",
        ),
        ("quant.rules=[{pattern: ''}]", "config key 'quant': pattern: expected a non-empty module-name glob"),
    ],
)
def test_a_bad_quant_key_is_a_one_line_config_error(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_config_choices_are_the_spec_choices():
    """The YAML schema and the spec accept the same values (pydantic Literals mirror the spec's tuples)."""
    from altgrad.integration.quant_spec import ROUNDINGS, SCALING_MODES
    from altgrad.quantization.scaling import AMAX_COMPUTE_ALGOS, MX_ROUNDINGS
    from altgrad.training.config import QuantConfig

    fields = QuantConfig.model_fields
    choices = {
        "scaling": SCALING_MODES, "rounding": ROUNDINGS, "amax_compute_algo": AMAX_COMPUTE_ALGOS,
        "mx_scale_rounding": MX_ROUNDINGS,
    }  # fmt: skip
    for key, allowed in choices.items():
        assert fields[key].annotation.__args__ == allowed, key
    for combination in itertools.product(SCALING_MODES, ROUNDINGS):
        settings = dict(zip(("scaling", "rounding"), combination, strict=True))
        assert load_config(None, [f"quant.{k}={v}" for k, v in settings.items()]).quant.plan() == QuantPlan(
            weight="E4M3", activation="E4M3", grad="E5M2", **settings
        )
