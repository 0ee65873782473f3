import copy
from pathlib import Path

import pytest
import torch
import yaml

from altgrad.experiments import grid as grid_module
from altgrad.experiments.grid import GridError, expand_grid, load_grid
from altgrad.training.config import ConfigError

TINY = {"model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16}, "train": {"max_steps": 5}}


def grid(**spec):
    return expand_grid({"base": TINY, "out_dir": "out", "name": "m", **spec})


def names(g):
    return [cell.name for cell in g.cells]


def test_cartesian_product_in_axis_order_with_validated_configs():
    g = grid(axes={"quant.weight": ["E4M3", "E3M4"], "optimizer.name": ["adamw", "grid"], "seed": [0, 1]})
    assert len(g.cells) == 8
    assert names(g)[:3] == ["E4M3-adamw-s0", "E4M3-adamw-s1", "E4M3-grid-s0"]
    cell = g.cells[-1]
    assert cell.name == "E3M4-grid-s1"
    assert cell.assignment == {"quant.weight": "E3M4", "optimizer.name": "grid", "seed": 1}
    assert (cell.config.quant.weight, cell.config.optimizer.name, cell.config.seed) == ("E3M4", "grid", 1)
    assert cell.config.model.n_embd == 32 and cell.config.logging.progress is False
    assert str(cell.run_dir) == "out/m/E3M4-grid-s1"
    assert cell.baseline is None and cell.equivalent_to is None
    assert g.axes == {"quant.weight": ["E4M3", "E3M4"], "optimizer.name": ["adamw", "grid"], "seed": [0, 1]}
    assert g.base.model.n_embd == 32 and str(g.matrix_dir) == "out/m"


def test_linked_keys_and_labelled_compound_values():
    rules = [{"pattern": "*.mlp.*", "weight": "E3M4"}]
    g = grid(
        axes={
            "quant.weight,quant.activation": ["E5M2"],
            "quant.rules": [{"label": "uniform", "value": []}, {"label": "mixed", "value": rules}],
            "optimizer": [{"label": "grid-m5", "value": {"name": "grid", "momentum": 0.5}}],
        }
    )
    assert names(g) == ["E5M2-uniform-grid-m5", "E5M2-mixed-grid-m5"]
    mixed = g.cells[1]
    assert mixed.assignment == {
        "quant.weight": "E5M2", "quant.activation": "E5M2", "quant.rules": "mixed", "optimizer": "grid-m5",
    }  # fmt: skip
    assert mixed.config.quant.activation == "E5M2" and mixed.config.quant.rules[0].weight == "E3M4"
    assert mixed.config.optimizer.betas == (0.9, 0.95)  # a mapping value merges into the section
    assert g.axes["quant.activation"] == ["E5M2"] and g.axes["quant.rules"] == ["uniform", "mixed"]
    with pytest.raises(GridError, match=r"axes.quant.rules\[0\]: a list value needs a label"):
        grid(axes={"quant.rules": [[]]})


def test_exclude_drops_matching_cells_and_include_adds_cells():
    g = grid(
        axes={"quant.weight": ["E4M3", "E7M0"], "optimizer.name": ["adamw", "grid"]},
        exclude=[{"quant.weight": "E7M0", "optimizer.name": "grid"}],
        include=[
            {"quant.weight": "E5M2", "train.lr": 0.01},
            {"quant.weight": "E4M3", "optimizer.name": "adamw"},
        ],
    )
    assert names(g) == [
        "E4M3-adamw",
        "E4M3-grid",
        "E7M0-adamw",
        "E5M2-lr0.01",
    ]  # the duplicate is not re-added
    assert g.cells[-1].assignment == {"quant.weight": "E5M2", "train.lr": 0.01}
    with pytest.raises(GridError, match="exclude\\[0\\]: 'seed' is not an axis"):
        grid(axes={"quant.weight": ["E4M3"]}, exclude=[{"seed": 0}])
    with pytest.raises(GridError, match="exclude\\[0\\].quant.weight: 'E4m4' is not one of the axis values"):
        grid(axes={"quant.weight": ["E4M3"]}, exclude=[{"quant.weight": "E4m4"}])


def test_baselines_are_crossed_with_seeds_only():
    baselines = {
        "fp32": {"train.precision": "fp32", "quant.enabled": False},
        "bf16": {"train.precision": "bf16"},
    }
    g = grid(axes={"quant.weight": ["E4M3", "E3M4"], "seed": [0, 1]}, baselines=baselines)
    assert names(g)[4:] == ["fp32-s0", "fp32-s1", "bf16-s0", "bf16-s1"]
    fp32 = g.cells[4]
    assert fp32.baseline == "fp32"
    assert fp32.assignment == {"train.precision": "fp32", "quant.enabled": False, "seed": 0}
    assert fp32.config.quant.enabled is False and fp32.config.quant.weight == "E4M3"  # base value, unused
    assert names(grid(axes={"quant.weight": ["E4M3"]}, baselines=baselines))[1:] == ["fp32", "bf16"]


def test_names_are_stable_readable_sanitized_and_unique():
    spec = {"axes": {"quant.weight": ["e3m4:bias=1", "E4M3"], "train.lr": [0.001], "quant.enabled": [True]}}
    assert names(grid(**spec)) == ["e3m4_bias_1-lr0.001-enabled_true", "E4M3-lr0.001-enabled_true"]
    assert names(grid(**spec)) == names(grid(**spec))
    with pytest.raises(GridError, match="both named 'a_b'; give their values distinct labels"):
        grid(axes={"quant.rules": [{"label": "a/b", "value": []}, {"label": "a:b", "value": []}]})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"axes": {"quant.wieght": ["E4M3"]}},
            "cell 'E4M3' (quant.wieght=E4M3): config key 'quant.wieght': unknown key",
        ),
        (
            {"axes": {"quant.weight": ["E4M3", "E9M9"], "seed": [0]}},
            "cell 'E9M9-s0' (quant.weight=E9M9 seed=0): config key 'quant.weight': unknown format 'E9M9'",
        ),
        ({"axes": {"name": ["x"]}}, "key 'name': 'name' is not settable here"),
        ({"axes": {"seed": []}}, "axes.seed: expected a non-empty list"),
        ({"axes": {"seed": [0, 0]}}, "axes.seed: a value (or label) is listed twice"),
        ({"axis": {"seed": [0]}}, "unknown key(s) axis; allowed: name, out_dir, base, axes"),
        (
            {"baselines": {"fp32": {"train.precision": "fp8"}}},
            "cell 'fp32' (train.precision=fp8): config key",
        ),
        ({"base": {"train": {"lrr": 1}}}, "base: config key 'train.lrr': unknown key"),
        ({"axes": {"seed": [0]}, "exclude": [{"seed": 0}]}, "the grid has no cells"),
    ],
)
def test_validation_errors_name_the_cell_and_the_key(spec, message):
    with pytest.raises(GridError) as error:
        expand_grid({"base": TINY, **spec} if "base" not in spec else spec)
    assert message in str(error.value)


def test_load_grid_reads_a_base_file_relative_to_the_grid(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "small.yaml").write_text(yaml.safe_dump(TINY))
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"base": "configs/small.yaml", "axes": {"seed": [3]}}))
    g = load_grid(tmp_path / "g.yaml")
    assert g.name == "g" and str(g.matrix_dir) == "runs/g"  # name: the file stem; out_dir: the base's
    assert g.cells[0].config.model.n_embd == 32 and g.cells[0].config.seed == 3
    (tmp_path / "bad.yaml").write_text("axes: {seed: [0]}\nbase: missing.yaml\n")
    with pytest.raises(GridError, match=r"grid .*bad.yaml: base: run config file not found"):
        load_grid(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="grid file not found"):
        load_grid(tmp_path / "nope.yaml")


@pytest.mark.parametrize("scaling", ["delayed", "current", "per_channel", "mx"])
def test_uniform_grids_and_identical_formats_are_flagged_equivalent(scaling):
    g = grid(
        base={**TINY, "quant": {"scaling": scaling}},
        axes={
            "quant.weight,quant.activation": ["E0M7", "E1M6", "E2M5", "E4M3", "float8_e4m3fn"],
            "optimizer.name": ["adamw", "grid"],
        },  # fmt: skip
        baselines={"fp32": {"quant.enabled": False}},
    )
    equivalent = {cell.name: cell.equivalent_to for cell in g.cells if cell.equivalent_to}
    assert equivalent == {
        "E0M7-adamw": "E1M6-adamw", "E0M7-grid": "E1M6-grid",
        "float8_e4m3fn-adamw": "E4M3-adamw", "float8_e4m3fn-grid": "E4M3-grid",
    }  # fmt: skip


def test_equivalence_follows_the_grid_not_the_name():
    g = grid(
        axes={"quant.weight": ["E4M3", "e4m3:bias=8,specials=fn", "e4m3:bias=8", "none", "fp32"]},
    )
    equivalent = {cell.name: cell.equivalent_to for cell in g.cells if cell.equivalent_to}
    assert equivalent == {"e4m3_bias_8_specials_fn": "E4M3", "fp32": "none"}  # specials=none is another grid
    storage = grid(axes={"optimizer.name": ["adamw"], "optimizer.weight_storage": ["E1M6", "E0M7"]})
    assert [cell.equivalent_to for cell in storage.cells] == [None, None]  # stored at scale 1: no absorbing


def test_no_equivalence_when_format_shifts_follow_the_ladder_by_name():
    base = {**TINY, "stability": {"format_shift": True}}
    g = grid(base=base, axes={"quant.weight,quant.activation": ["E1M6", "E0M7", "E4M3", "float8_e4m3fn"]})
    assert [cell.equivalent_to for cell in g.cells] == [None] * 4


def test_equivalence_needs_every_other_setting_equal():
    g = grid(
        axes={"quant.weight": ["E1M6", "E0M7"], "quant.activation": ["E1M6", "E0M7"], "seed": [0, 1]},
        include=[{"quant.weight": "E0M7", "quant.activation": "E1M6", "seed": 0, "train.lr": 0.01}],
    )
    equivalent = {cell.name: cell.equivalent_to for cell in g.cells if cell.equivalent_to}
    assert equivalent == {
        "E1M6-E0M7-s0": "E1M6-E1M6-s0", "E1M6-E0M7-s1": "E1M6-E1M6-s1", "E0M7-E1M6-s0": "E1M6-E1M6-s0",
        "E0M7-E1M6-s1": "E1M6-E1M6-s1", "E0M7-E0M7-s0": "E1M6-E1M6-s0", "E0M7-E0M7-s1": "E1M6-E1M6-s1",
    }  # fmt: skip


@pytest.mark.parametrize("scaling", ["delayed", "current", "per_channel", "rowwise", "mx"])
@pytest.mark.parametrize(
    ("first", "second"), [("E0M7", "E1M6"), ("E1M6", "e1m6:bias=3"), ("E4M3", "e4m3:bias=9,specials=fn")]
)
def test_layers_of_the_same_grid_compute_the_same_numbers(scaling, first, second):
    """The claim behind the flag, checked on the real quantized layer: outputs and gradients coincide."""
    integration = pytest.importorskip("altgrad.integration", reason="altgrad.integration does not import yet")
    from altgrad.quantization.formats import E5M2, get_format, same_grid

    assert same_grid(first, second)
    results = []
    for fmt in (get_format(first), get_format(second)):
        torch.manual_seed(0)
        linear = torch.nn.Linear(64, 32)
        spec = integration.LayerQuantSpec(weight=fmt, activation=fmt, grad=E5M2, scaling=scaling)
        layer = integration.QuantizedLinear(linear, spec)
        x = torch.randn(4, 64, requires_grad=True)
        for _ in range(2):  # the delayed scale comes from the first call's amax
            y = layer(x)
        y.square().sum().backward()
        results.append((y.detach(), x.grad, layer.weight.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_shipped_grids_expand():
    full = load_grid("experiments/test_matrix.yaml")
    assert len(full.cells) == 10 * 3 * 2 * 3 + 2 * 3
    assert {c.name for c in full.cells if c.baseline} == {
        f"{b}-s{s}" for b in ("fp32", "bf16") for s in range(3)
    }
    flagged = {c.name: c.equivalent_to for c in full.cells if c.equivalent_to}
    assert flagged["E0M7-manifold_adamw-mixed-s1"] == "E1M6-manifold_adamw-mixed-s1"
    assert flagged["float8_e5m2-grid-uniform-s0"] == "E5M2-grid-uniform-s0"
    assert all(c.config.quant.grad == "E5M2" for c in full.cells)
    quick = load_grid("experiments/quick.yaml")
    assert {c.equivalent_to for c in quick.cells} == {None} | {
        f"E1M6-{optimizer}-s{seed}" for optimizer in ("adamw", "manifold_adamw") for seed in range(3)
    }
    assert quick.cells[-1].name == "fp32-s2"


def test_dependent_axis_takes_the_values_of_its_by_axis():
    lrs = {"by": "optimizer.name", "values": {"adamw": [1e-3, 3e-3], "grid": [0.5]}}
    g = grid(axes={"optimizer.name": ["adamw", "grid"], "optimizer.lr": lrs, "seed": [0, 1]})
    assert names(g) == [
        "adamw-lr0.001-s0", "adamw-lr0.001-s1", "adamw-lr0.003-s0", "adamw-lr0.003-s1",
        "grid-lr0.5-s0", "grid-lr0.5-s1",
    ]  # fmt: skip
    assert [(c.config.optimizer.name, c.config.optimizer.lr) for c in g.cells[::2]] == [
        ("adamw", 1e-3), ("adamw", 3e-3), ("grid", 0.5),
    ]  # fmt: skip
    assert g.cells[-1].assignment == {"optimizer.name": "grid", "optimizer.lr": 0.5, "seed": 1}
    assert g.axes["optimizer.lr"] == [1e-3, 3e-3, 0.5]
    dropped = grid(
        axes={"optimizer.name": ["adamw", "grid"], "optimizer.lr": lrs},
        exclude=[{"optimizer.lr": 0.5}],
    )
    assert names(dropped) == ["adamw-lr0.001", "adamw-lr0.003"]


@pytest.mark.parametrize(
    ("lrs", "message"),
    [
        ({"by": "seed", "values": {"adamw": [1]}}, r"'seed' is not an axis listed before it"),
        ({"by": "optimizer.name", "values": {"adamw": [1e-3]}}, r"one list per value .* missing \['grid'\]"),
        ({"by": "optimizer.name", "values": {"adamw": [1], "grid": [1], "sgd": [1]}}, r"unknown \['sgd'\]"),
        ({"by": "optimizer.name", "values": {"adamw": [], "grid": [1]}}, r"lr.values.adamw: expected"),
        ({"by": "optimizer.name"}, r"expected a list of values or \{by"),
    ],
)
def test_dependent_axis_errors_name_the_problem(lrs, message):
    with pytest.raises(GridError, match=message):
        grid(axes={"optimizer.name": ["adamw", "grid"], "optimizer.lr": lrs, "seed": [0]})


def _stand_ins(validate):
    """Validate with ``madam`` -> ``adamw`` and weight_storage ``quantized`` -> ``E4M3`` when this branch's
    config does not know them yet (both come from another branch): the expansion is what is tested here."""

    def config_from_dict(data):
        try:
            return validate(data)
        except ConfigError:
            data = copy.deepcopy(data)
            optimizer = data.setdefault("optimizer", {})
            optimizer["name"] = (
                "adamw" if optimizer.get("name") == "madam" else optimizer.get("name", "adamw")
            )
            if optimizer.get("weight_storage") == "quantized":
                optimizer["weight_storage"] = "E4M3"
            return validate(data)

    return config_from_dict


def test_answer_grid_expands_to_every_optimizer_at_its_own_lrs(monkeypatch):
    monkeypatch.setattr(grid_module, "config_from_dict", _stand_ins(grid_module.config_from_dict))
    answer = load_grid("experiments/answer.yaml")
    assert len(answer.cells) == 6 * (3 * 3 + 1) * 2 * 3 + 3
    quantized = [c.assignment for c in answer.cells if not c.baseline]
    lrs = {}
    for a in quantized:
        lrs.setdefault(a["optimizer.name"], set()).add(a["optimizer.lr"])
    assert lrs == {
        "adamw": {1e-3, 3e-3},
        "manifold_adamw": {0.3, 1.0},
        "grid": {0.3, 1.0},
        "madam": {3e-3, 1e-2},
    }
    assert {a["quant.weight"] for a in quantized} == {"E5M2", "E4M3", "E3M4", "E2M5", "E1M6", "E7M0"}
    assert {a["optimizer"] for a in quantized if a["optimizer.name"] == "grid"} == {"master"}
    assert {a["optimizer"] for a in quantized if a["optimizer.name"] == "madam"} == {
        "master",
        "nearest",
        "stochastic",
    }
    assert [c.name for c in answer.cells if c.baseline] == ["fp32-s0", "fp32-s1", "fp32-s2"]
    assert answer.cells[0].name == "E5M2-adamw-lr0.001-master-s0"
    stochastic = next(c for c in answer.cells if c.name == "E4M3-manifold_adamw-lr0.3-stochastic-s2")
    assert (
        stochastic.config.optimizer.storage_rounding == "stochastic" and stochastic.config.optimizer.lr == 0.3
    )


def test_shipped_grids_have_at_least_three_seeds():
    for path in sorted(Path("experiments").glob("*.yaml")):
        seeds = yaml.safe_load(path.read_text())["axes"]["seed"]
        assert len(seeds) >= 3, f"{path}: {seeds}"


def test_cells_log_to_wandb_grouped_by_matrix_and_tagged_with_their_settings():
    g = grid(
        axes={"quant.weight": ["E4M3", "E1M6", "E0M7"], "seed": [0]},
        baselines={"fp32": {"quant.enabled": False}},
    )
    cell, baseline = g.cells[0], g.cells[-1]
    assert (cell.config.logging.wandb_group, cell.config.logging.wandb_tags) == (
        "m",
        ["quant.weight=E4M3", "seed=0"],
    )
    assert baseline.config.logging.wandb_tags == ["quant.enabled=false", "seed=0"]
    assert g.cells[2].equivalent_to == "E1M6-s0"  # the tags differ; the logging keys change no result


def test_one_cell_class_from_the_grid_to_the_report(tmp_path):
    """The grid's cells are the report's cells; matrix.json written from them reads back equal."""
    import dataclasses

    from altgrad import analysis, experiments
    from altgrad.analysis.matrix import load_matrix
    from altgrad.experiments.runner import _record, write_matrix_json

    assert experiments.Cell is analysis.Cell
    g = expand_grid(
        {"base": TINY, "out_dir": str(tmp_path), "name": "m", "axes": {"quant.weight": ["E1M6", "E0M7"]},
         "baselines": {"fp32": {"quant.enabled": False}}}
    )  # fmt: skip
    statuses = [("completed", None), ("failed", "RuntimeError: x"), ("pending", None)]
    write_matrix_json(g, [_record(cell, *status) for cell, status in zip(g.cells, statuses, strict=True)])
    read = load_matrix(g.matrix_dir).cells
    fields = ("name", "assignment", "baseline", "status", "error", "equivalent_to")
    expected = [
        dataclasses.replace(cell, status=s, error=e) for cell, (s, e) in zip(g.cells, statuses, strict=True)
    ]
    assert [[getattr(c, f) for f in fields] for c in read] == [
        [getattr(c, f) for f in fields] for c in expected
    ]
    assert read[1].equivalent_to == "E1M6" and read[2].baseline == "fp32"
    assert (
        g.cells[1].run_dir == tmp_path / "m" / "E0M7" and g.cells[1].optimizer == "adamw"
    )  # from its config
