"""Experiment grids: a YAML file of axes expanded into named, validated run configs ("cells").

A grid file::

    name: quick                       # the matrix folder name (default: the file's stem)
    out_dir: runs                     # cells run in <out_dir>/<name>/<cell> (default: the base's out_dir)
    base: ../configs/small.yaml       # a run config file (relative to this file) or an inline mapping
    axes:                             # config key path -> values; the cells are their cartesian product
      quant.weight,quant.activation: [E4M3, E3M4, E1M6, E0M7]   # "a,b": one axis setting both keys
      optimizer.name: [adamw, manifold_adamw]
      quant.rules:                    # compound values (lists, mappings) need a label
        - {label: uniform, value: []}
        - {label: mixed, value: [{pattern: "*.mlp.*", weight: E3M4, activation: E3M4}]}
      optimizer.lr:                   # values that depend on an earlier axis: {by: <axis>, values: ...}
        by: optimizer.name
        values: {adamw: [1.0e-3, 3.0e-3], manifold_adamw: [0.5, 1.0]}
      seed: [0, 1]
    exclude:                          # drop the product cells that match every key of an entry
      - {optimizer.name: manifold_adamw, quant.rules: mixed}
    include:                          # extra cells (keys not given keep the base value)
      - {quant.weight: E5M2, optimizer.name: grid}
    baselines:                        # crossed with the seed axis only
      fp32: {train.precision: fp32, quant.enabled: false}
      bf16: {train.precision: bf16, quant.enabled: false}

A dependent axis lists its values per value (label) of an earlier axis, which it names with ``by``:
each cell takes the list of its own ``by`` value (here: each optimizer its own learning rates), so a
grid can sweep settings whose meaningful range differs between the values of another axis.

A value is set at its key path in the base config; a mapping value is merged into the mapping already
there, anything else (a list included) replaces it. Exclude entries name compound values by label.
Every cell runs with ``logging.progress`` off (the matrix shows one bar over cells), and with
``logging.wandb_group`` the matrix name and ``logging.wandb_tags`` its settings (``quant.weight=E4M3``):
the logging keys are no part of a cell's identity (equivalence, include de-duplication, resume).

Cell names join one short token per axis in axis order: strings as they are, numbers prefixed by the
key's last part (``seed`` -> ``s0``, ``train.lr`` -> ``lr0.001``), compound values by label, all
sanitized to ``[A-Za-z0-9_.-]``: ``E4M3-adamw-uniform-s0``; a baseline is ``fp32-s0``. A cell is an
``altgrad.analysis.matrix.Cell`` holding its validated ``config``: the class the report reads
matrix.json back into.

Equivalent cells: two formats whose values are equal up to a power-of-two factor, with the same
special values (``formats.same_grid``: E1M6 and E0M7, ``float8_e4m3fn`` and E4M3, E1M6 at any
bias), are the same grid at scales that differ by that factor. Every scaling mode picks the scale
from the tensor's amax relative to the format's range (per tensor, per output channel, per row, or
per MX block as ``2^(floor(log2 amax) - emax)``), so the scale absorbs that factor exactly and the
quantized tensors, grid steps and codes coincide bit for bit. Two cells whose configs agree once
every quant format is replaced by its grid (``formats.grid_key``; every spelling of full precision
alike) must give the same results: the later one (E0M7 cells after E1M6 cells) gets
``equivalent_to`` naming the first. Not with ``stability.format_shift`` on: shifts walk the E/M
ladder by name (E1M6 -> E0M7, E0M7 -> nothing). ``optimizer.weight_storage`` formats are compared by
name: they store weights at scale 1, which absorbs nothing.

Example::

    >>> grid = load_grid("experiments/quick.yaml")
    >>> [cell.name for cell in grid.cells][:2]
    ['E5M2-adamw-s0', 'E5M2-adamw-s1']
    >>> grid.cells[0].config.run_dir
    PosixPath('runs/quick/E5M2-adamw-s0')
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from altgrad.analysis.matrix import Cell
from altgrad.integration.quant_spec import UNSET
from altgrad.quantization.formats import FloatFormat, grid_key, parse_format
from altgrad.training.config import ConfigError, RunConfig, config_from_dict, parse_yaml

GRID_KEYS = ("name", "out_dir", "base", "axes", "include", "exclude", "baselines")
RESERVED_KEYS = ("name", "out_dir")  # set per cell by the grid
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class GridError(ConfigError):
    """A problem in a grid file; the message names the grid, the cell or entry, and the key."""


@dataclass(frozen=True)
class Grid:
    """An expanded grid: the cells in order, the axes (key path -> values as in assignments), the base."""

    name: str
    matrix_dir: Path
    axes: dict[str, list[Any]]
    base: RunConfig
    cells: list[Cell]


@dataclass(frozen=True)
class _Value:
    """An axis value: what is written into the config, and how it appears in names and assignments."""

    value: Any
    label: Any


def _parse_value(raw: Any, where: str) -> _Value:
    if isinstance(raw, dict):
        if set(raw) != {"label", "value"} or not isinstance(raw["label"], str):
            raise GridError(
                f"{where}: a mapping value must be {{label: <name>, value: <setting>}}; got {raw!r}"
            )
        return _Value(raw["value"], raw["label"])
    if isinstance(raw, list):
        raise GridError(f"{where}: a list value needs a label: {{label: <name>, value: {raw!r}}}")
    return _Value(raw, raw)


def _split_key(key: str) -> list[str]:
    """``"quant.weight,quant.activation"`` -> both key paths (one axis setting several keys)."""
    parts = [part.strip() for part in str(key).split(",")]
    for part in parts:
        if not part or part.split(".")[0] in RESERVED_KEYS:
            raise GridError(
                f"key {key!r}: {part!r} is not settable here (cell names and out_dir come from the grid)"
            )
    return parts


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    *sections, last = key.split(".")
    node = data
    for part in sections:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise GridError(f"key {key!r}: '{part}' is not a section")
        node = child
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = {**node[last], **copy.deepcopy(value)}
    else:
        node[last] = copy.deepcopy(value)


def _token(key: str, label: Any) -> str:
    """A value's part of a cell name: ``E4M3``; seed 0 -> ``s0``; quant.enabled False -> ``enabled_false``."""
    short = "s" if key == "seed" else key.rsplit(".", 1)[-1]
    if isinstance(label, str):
        text = label
    elif isinstance(label, bool) or label is None:
        text = f"{short}_{json.dumps(label)}"
    else:
        text = f"{short}{label}"
    return _UNSAFE.sub("_", text).strip("_") or "_"


_GRID_NUMBERS: dict[tuple, int] = {}
"""``formats.grid_key`` -> a small number naming that grid in equivalence keys (a key holds every value)."""


@functools.cache
def _grid_of(name: str | None) -> Any:
    """What a quant format field means, up to scale: ``("grid", n)``, one n per ``formats.grid_key``;
    None for full precision however spelled; a rule's ``UNSET`` as it is."""
    if name == UNSET:
        return UNSET
    fmt = parse_format(name)
    return None if fmt is None else ("grid", _GRID_NUMBERS.setdefault(grid_key(fmt), len(_GRID_NUMBERS)))


def _quant_formats(config: RunConfig) -> list[FloatFormat]:
    """Every quant format field of the config (defaults, then each rule's), full precision left out."""
    quant = config.quant
    names = [quant.weight, quant.activation, quant.grad]
    names += [getattr(rule, kind) for rule in quant.rules for kind in ("weight", "activation", "grad")]
    return [fmt for name in names if name != UNSET and (fmt := parse_format(name)) is not None]


def _equivalence_key(config: RunConfig) -> str:
    data = config.to_dict()
    del data["name"], data["logging"]
    quant = data["quant"]
    if not quant["enabled"]:
        data["quant"] = {"enabled": False}
    elif not data["stability"]["format_shift"]:  # shifts follow the E/M ladder by name: E1M6 -> E0M7
        for kind in ("weight", "activation", "grad"):
            quant[kind] = _grid_of(quant[kind])
            for rule in quant["rules"]:
                rule[kind] = _grid_of(rule[kind])
    return repr(data)


def _mark_equivalent(cells: list[Cell]) -> list[Cell]:
    """Point each cell whose results must equal an earlier-ranked cell's at that cell."""

    def e0_count(cell: Cell) -> int:
        return sum(fmt.exponent_bits == 0 for fmt in _quant_formats(cell.config))

    ranked = sorted(range(len(cells)), key=lambda i: (e0_count(cells[i]), i))
    first: dict[str, str] = {}
    marked = list(cells)
    for i in ranked:
        key = _equivalence_key(cells[i].config)
        if key in first:
            marked[i] = dataclasses.replace(cells[i], equivalent_to=first[key])
        else:
            first[key] = cells[i].name
    return marked


def _parse_axis_values(key: str, values: Any) -> list[_Value]:
    if not isinstance(values, list) or not values:
        raise GridError(f"axes.{key}: expected a non-empty list of values")
    parsed = [_parse_value(v, f"axes.{key}[{i}]") for i, v in enumerate(values)]
    labels = [repr(v.label) for v in parsed]
    if len(set(labels)) != len(labels):
        raise GridError(f"axes.{key}: a value (or label) is listed twice: {values!r}")
    return parsed


def _parse_dependent_axis(
    key: str, spec: dict[str, Any], earlier: dict[str, list[_Value]]
) -> tuple[str, dict[Any, list[_Value]]]:
    """``{by: <earlier axis>, values: {<its label>: [values], ...}}`` -> (by, label -> parsed values)."""
    if set(spec) != {"by", "values"} or not isinstance(spec["values"], dict):
        expected = "a list of values or {by: <axis>, values: {<value>: [...]}}"
        raise GridError(f"axes.{key}: expected {expected}")
    by = str(spec["by"])
    if by not in earlier:
        raise GridError(f"axes.{key}.by: {by!r} is not an axis listed before it; axes: {', '.join(earlier)}")
    labels = [v.label for v in earlier[by]]
    unknown = [label for label in spec["values"] if label not in labels]
    missing = [label for label in labels if label not in spec["values"]]
    if unknown or missing:
        problem = f"unknown {unknown!r}" if unknown else f"missing {missing!r}"
        raise GridError(f"axes.{key}.values: one list per value of {by} ({labels!r}); {problem}")
    return by, {label: _parse_axis_values(f"{key}.values.{label}", spec["values"][label]) for label in labels}


def _combinations(
    axes: dict[str, list[_Value]], dependent: dict[str, tuple[str, dict[Any, list[_Value]]]]
) -> list[dict[str, _Value]]:
    """The cartesian product of the axes in order; a dependent axis ranges over its ``by`` value's list."""
    combinations: list[dict[str, _Value]] = [{}]
    for key, values in axes.items():
        if key in dependent:
            by, per_value = dependent[key]
            combinations = [c | {key: v} for c in combinations for v in per_value[c[by].label]]
        else:
            combinations = [c | {key: v} for c in combinations for v in values]
    return combinations


def _read_base(raw: Any, root: Path) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, str):
        path = root / raw
        if not path.is_file():
            raise GridError(f"base: run config file not found: {path}")
        raw = parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(raw, dict):
        raise GridError("base: expected a run config mapping or the path to a run config YAML file")
    return raw


def _entries(spec: dict[str, Any], field: str) -> list[dict[str, _Value]]:
    raw = spec.get(field) or []
    if not isinstance(raw, list) or not all(isinstance(entry, dict) and entry for entry in raw):
        raise GridError(f"{field}: expected a list of non-empty mappings of key path -> value")
    return [{key: _parse_value(value, f"{field}[{i}].{key}") for key, value in entry.items()}
            for i, entry in enumerate(raw)]  # fmt: skip


def expand_grid(spec: dict[str, Any], root: Path = Path("."), default_name: str = "matrix") -> Grid:
    """Expand a parsed grid mapping (paths relative to ``root``) into validated cells."""
    if not isinstance(spec, dict):
        raise GridError("the top level must be a mapping with keys: " + ", ".join(GRID_KEYS))
    unknown = sorted(set(spec) - set(GRID_KEYS))
    if unknown:
        raise GridError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(GRID_KEYS)}")
    base = _read_base(spec.get("base"), root)
    name = _UNSAFE.sub("_", str(spec.get("name") or default_name))
    out_dir = spec.get("out_dir") or base.get("out_dir", "runs")
    matrix_dir = Path(out_dir) / name

    raw_axes = spec.get("axes") or {}
    if not isinstance(raw_axes, dict):
        raise GridError("axes: expected a mapping of key path -> list of values")
    axes: dict[str, list[_Value]] = {}  # every value an axis can take (a dependent axis: all its lists)
    dependent: dict[str, tuple[str, dict[Any, list[_Value]]]] = {}  # key -> (by, by-label -> values)
    for key, values in raw_axes.items():
        _split_key(key)
        if isinstance(values, dict):
            by, per_value = _parse_dependent_axis(str(key), values, axes)
            dependent[str(key)] = (by, per_value)
            axes[str(key)] = list({repr(v.label): v for vs in per_value.values() for v in vs}.values())
        else:
            axes[str(key)] = _parse_axis_values(str(key), values)

    def resolve(settings: dict[str, _Value], cell_name: str) -> tuple[RunConfig, dict[str, Any]]:
        data = copy.deepcopy(base)
        assignment: dict[str, Any] = {}
        for key, value in settings.items():
            for part in _split_key(key):
                _set(data, part, value.value)
                assignment[part] = value.label
        data.update(name=cell_name, out_dir=str(matrix_dir))
        _set(data, "logging.progress", False)
        _set(data, "logging.wandb_group", name)
        _set(data, "logging.wandb_tags", [format_assignment({k: v})[:64] for k, v in assignment.items()])
        return config_from_dict(data), assignment

    def make_cell(settings: dict[str, _Value], tokens: list[str], baseline: str | None = None) -> Cell:
        cell_name = "-".join(tokens) or "base"
        try:
            config, assignment = resolve(settings, cell_name)
        except ConfigError as error:
            where = " ".join(f"{k}={v.label}" for k, v in settings.items())
            raise GridError(f"cell {cell_name!r} ({where}): {error}") from None
        return Cell(cell_name, assignment, baseline, base=config.to_dict(), config=config)

    try:
        resolved_base = resolve({}, name)[0]
    except ConfigError as error:
        raise GridError(f"base: {error}") from None

    exclude = _entries(spec, "exclude")
    for i, entry in enumerate(exclude):
        for key, value in entry.items():
            if key not in axes:
                raise GridError(f"exclude[{i}]: {key!r} is not an axis; axes: {', '.join(axes)}")
            if value.label not in [v.label for v in axes[key]]:
                raise GridError(f"exclude[{i}].{key}: {value.label!r} is not one of the axis values")

    cells = []
    for settings in _combinations(axes, dependent):
        if any(all(settings[k].label == v.label for k, v in entry.items()) for entry in exclude):
            continue
        cells.append(make_cell(settings, [_token(_split_key(k)[0], v.label) for k, v in settings.items()]))

    seen = {_without_name(cell.config) for cell in cells}
    for entry in _entries(spec, "include"):
        ordered = {k: entry[k] for k in axes if k in entry} | entry
        cell = make_cell(ordered, [_token(_split_key(k)[0], v.label) for k, v in ordered.items()])
        if _without_name(cell.config) not in seen:
            seen.add(_without_name(cell.config))
            cells.append(cell)

    baselines = spec.get("baselines") or {}
    if not isinstance(baselines, dict) or not all(isinstance(v, dict) for v in baselines.values()):
        raise GridError("baselines: expected a mapping of baseline name -> {key path: value}")
    seeds = axes.get("seed", [None])
    for label, overrides in baselines.items():
        settings = {k: _parse_value(v, f"baselines.{label}.{k}") for k, v in overrides.items()}
        for seed in seeds:
            extra = {"seed": seed} if seed is not None else {}
            tokens = [_token("baseline", str(label))] + ([_token("seed", seed.label)] if extra else [])
            cells.append(make_cell(settings | extra, tokens, baseline=str(label)))

    if not cells:
        raise GridError("the grid has no cells: every product cell is excluded and there is nothing else")
    names: dict[str, Cell] = {}
    for cell in cells:
        if cell.name in names:
            first = format_assignment(names[cell.name].assignment)
            raise GridError(
                f"cells {first} and {format_assignment(cell.assignment)} are both named {cell.name!r}; "
                "give their values distinct labels"
            )
        names[cell.name] = cell

    axis_labels = {part: [v.label for v in vals] for key, vals in axes.items() for part in _split_key(key)}
    return Grid(name, matrix_dir, axis_labels, resolved_base, _mark_equivalent(cells))


def _without_name(config: RunConfig) -> str:
    data = config.to_dict()
    del data["name"], data["logging"]  # logging (W&B tags name the settings) changes no result
    return repr(data)


def format_assignment(assignment: dict[str, Any]) -> str:
    """``{"quant.weight": "E4M3", "quant.enabled": False}`` -> ``"quant.weight=E4M3 quant.enabled=false"``."""
    return (
        " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in assignment.items()) or "base"
    )


def load_grid(path: str | Path) -> Grid:
    """Read a grid YAML file and expand it (every cell validated before anything runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file not found: {path}")
    try:
        return expand_grid(parse_yaml(path.read_text(), str(path)) or {}, path.parent, path.stem)
    except GridError as error:
        raise GridError(f"grid {path}: {error}") from None
