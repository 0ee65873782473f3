"""Read an experiment matrix folder: the cells of ``matrix.json`` matched to their run folders.

``matrix.json`` (written by the matrix runner) lists the cells::

    {"cells": [{"name": "e4m3-adamw-s0", "assignment": {"quant.weight": "E4M3", "optimizer.name": "adamw",
                "seed": 0}, "baseline": null, "status": "completed", "error": null, "equivalent_to": null}],
     "axes": {...}}

Without matrix.json every run folder under the matrix folder is a cell, and its assignment is the set of
config fields that differ between runs (names and paths left out).

Example::

    >>> matrix = load_matrix("runs/matrix")                               # doctest: +SKIP
    >>> [(cell.format, cell.optimizer, cell.seed, cell.status) for cell in matrix.cells]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from altgrad.analysis.runs import Run, find_runs, flatten, load_run, lookup, render_value

if TYPE_CHECKING:  # the grid builds cells with their validated config; reading a matrix needs none
    from altgrad.training.config import RunConfig

MATRIX_FILE = "matrix.json"
BASELINE_PRECISIONS = ("fp32", "bf16")
OPTIMIZER_KEY = "optimizer.name"
SEED_KEY = "seed"
RULES_KEY = "quant.rules"
FORMAT_KEYS = ("quant.weight", "quant.activation", "quant.grad")
BASELINE_KEY_PREFIXES = ("quant.", "train.precision")
"""Assignment keys that make a cell a baseline; its ``baseline`` name says it, labels leave them out."""
LR_KEYS = ("optimizer.lr", "train.lr")
"""Assignment keys that set a learning rate: cells differing only in these are one optimizer's lr sweep."""
STORAGE_KEY = "optimizer.weight_storage"
MASTER_COPY = "fp32 master"
"""The storage of a cell whose optimizer keeps an fp32 master copy of the weights."""
ON_GRID = "on grid (grid optimizer)"
"""The storage of GridOptim, which keeps its weights on the format's grid (it takes no weight_storage)."""
IDENTITY_LEAVES = (
    "name", "run_name", "out_dir", "output_dir", "run_dir", "dir", "path", "root", "wandb_group", "wandb_tags"
)  # fmt: skip
"""Config leaves that name or locate a run rather than describe it; never treated as matrix axes."""


def keeps_master_copy(storage: Any) -> bool:
    """Whether an ``optimizer.weight_storage`` value keeps an fp32 master copy of the weights: None or a
    name of "no format" (``formats.NO_FORMAT_NAMES``)."""
    from altgrad.quantization.formats import NO_FORMAT_NAMES  # here: reading a matrix needs no torch

    return storage is None or (isinstance(storage, str) and storage.strip().lower() in NO_FORMAT_NAMES)


@dataclass
class Cell:
    """One cell of a matrix, as the grid builds it (``altgrad.experiments.load_grid``) and as matrix.json
    records it (``record``, ``from_record``): its name, what it assigns, its baseline, the cell whose
    results it must equal, how it ended; its run folder once read (``run``), and its validated run config
    when the grid built it (``config``)."""

    name: str
    assignment: dict[str, Any]
    baseline: str | None = None
    status: str = "pending"
    error: str | None = None
    equivalent_to: str | None = None
    run: Run | None = None
    base: dict[str, Any] = field(default_factory=dict)
    """The config read when there is no run folder: the matrix's base config (matrix.json ``base``; with
    the assignment, the cell's config) for a cell read back, the cell's own config for one the grid built."""
    config: RunConfig | None = None

    @property
    def run_dir(self) -> Path | None:
        """Where the cell runs: its config's run folder, else the folder read; None when neither is known."""
        if self.config is not None:
            return self.config.run_dir
        return None if self.run is None else self.run.path

    def record(self) -> dict[str, Any]:
        """The cell's entry in matrix.json (``from_record`` reads it back)."""
        return {"name": self.name, "assignment": self.assignment, "baseline": self.baseline,
                "status": self.status, "error": self.error, "equivalent_to": self.equivalent_to}  # fmt: skip

    @classmethod
    def from_record(cls, entry: dict[str, Any], run: Run | None, base: dict[str, Any]) -> Cell:
        """A cell from its matrix.json entry (``record``), its run folder (None: none) and the base config."""
        return cls(
            name=str(entry["name"]),
            assignment=dict(entry.get("assignment") or {}),
            baseline=entry.get("baseline"),
            status=str(entry.get("status") or "pending"),
            error=entry.get("error"),
            equivalent_to=entry.get("equivalent_to"),
            run=run,
            base=base,
        )

    def _config(self, dotted: str) -> Any:
        return lookup(self.base if self.run is None else self.run.config, dotted)

    @property
    def seed(self) -> Any:
        if SEED_KEY in self.assignment:
            return self.assignment[SEED_KEY]
        seed = self._config("seed")
        return self._config("train.seed") if seed is None else seed

    @property
    def optimizer(self) -> str:
        name = self.assignment.get(OPTIMIZER_KEY) or self._config(OPTIMIZER_KEY)
        if name is None and self.run is not None:
            name = self.run.summary.get("optimizer")
            name = name.get("name") if isinstance(name, dict) else name
        return "not recorded" if name is None else str(name)

    @property
    def format(self) -> str:
        """The baseline name, or the formats the assignment sets: ``E4M3`` when every quantized tensor
        kind it sets gets the same one, else ``weight=E4M3, grad=E5M2``; else the config's weight format."""
        if self.baseline:
            return self.baseline
        formats = {
            key: render_value(value)
            for key, value in self.assignment.items()
            if any(part.strip() in FORMAT_KEYS for part in key.split(","))
        }
        if len(set(formats.values())) == 1:
            return next(iter(formats.values()))
        if formats:
            return ", ".join(f"{key.replace('quant.', '')}={value}" for key, value in formats.items())
        weight = self._config("quant.weight")
        return "quantized" if weight is None else render_value(weight)

    @property
    def storage(self) -> str:
        """How the optimizer stores the weights: ``fp32 master``, else the storage format (``quantized`` =
        the layer's forward format) with its rounding and ``+ kahan``: ``quantized stochastic``; ``ON_GRID``
        for the grid optimizer."""
        storage = self._config(STORAGE_KEY)
        if self.optimizer == "grid":
            return ON_GRID
        if keeps_master_copy(storage):
            return MASTER_COPY
        text = f"{storage} {self._config('optimizer.storage_rounding') or 'nearest'}"
        return text + " + kahan" if self._config("optimizer.kahan") else text

    @property
    def lr(self) -> float:
        """The peak lr of the quantized weights in the optimizer's unit: ``optimizer.lr`` when set, else
        the unit's default as in ``OptimizerConfig.lr_default`` (1.0 rung or ULP for grid and ulp_step
        manifold_adamw, 0.01 for madam, ``train.lr`` for the others; NaN when not recorded)."""
        value = self._config("optimizer.lr")
        if value is None:
            ulp_manifold = self.optimizer == "manifold_adamw" and self._config("optimizer.manifold_mode") in (
                None,
                "ulp_step",
            )
            if self.optimizer == "grid" or ulp_manifold:
                value = 1.0
            else:
                value = 0.01 if self.optimizer == "madam" else self._config("train.lr")
        return math.nan if value is None else float(value)

    @property
    def setting(self) -> str:
        """Everything assigned except seed, optimizer and learning rate: the cells whose optimizers are
        compared, each at its best lr."""
        return self._label(exclude=(SEED_KEY, OPTIMIZER_KEY, *LR_KEYS))

    @property
    def short_context(self) -> str:
        """The setting as values only (``E4M3 / mixed``; the lr left out), for plot legends and digests."""
        if self.baseline:
            return self.baseline
        left_out = (SEED_KEY, OPTIMIZER_KEY, *LR_KEYS)
        values = [render_value(v) for k, v in self.assignment.items() if k not in left_out]
        return " / ".join(dict.fromkeys(values)) or self.format

    @property
    def rules(self) -> Any:
        """The layer rules of this cell's config (``quant.rules``), None when it has none."""
        return self._config(RULES_KEY) or None

    @property
    def context(self) -> str:
        """Everything assigned except seed and optimizer: cells with equal context are comparable."""
        return self._label(exclude=(SEED_KEY, OPTIMIZER_KEY))

    @property
    def group(self) -> str:
        """Everything assigned except the seed: cells with equal group are seeds of one configuration."""
        return self._label(exclude=(SEED_KEY,))

    def _label(self, exclude: tuple[str, ...]) -> str:
        parts = [
            f"{key}={render_value(value)}"
            for key, value in self.assignment.items()
            if key not in exclude and not (self.baseline and key.startswith(BASELINE_KEY_PREFIXES))
        ]
        if self.baseline:
            parts.insert(0, f"baseline={self.baseline}")
        return ", ".join(parts) or self.format


@dataclass
class Matrix:
    """The cells of a matrix folder, in matrix.json order (else sorted by run folder), and reading notes."""

    path: Path
    cells: list[Cell]
    axes: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def short_labels(cells: list[Cell]) -> dict[str, str]:
    """A short label per context: the format when formats tell the settings (contexts up to the lr)
    apart, else the values without the lr; contexts differing only in the lr share their label."""
    formats = {cell.setting: cell.format for cell in cells}
    if len(set(formats.values())) == len(formats):
        return {cell.context: cell.format for cell in cells}
    return {cell.context: cell.short_context for cell in cells}


def _baseline_of(run: Run) -> str | None:
    """fp32 / bf16 when the run quantized nothing, else None."""
    quant = run.summary["quant"] if "quant" in run.summary else lookup(run.config, "quant")
    enabled = lookup(run.config, "quant.enabled")
    precision = (
        run.summary.get("precision")
        or lookup(run.config, "precision")
        or lookup(run.config, "train.precision")
    )
    if (not quant or enabled is False) and str(precision) in BASELINE_PRECISIONS:
        return str(precision)
    return None


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _varying_fields(runs: list[Run]) -> list[str]:
    flats = [flatten(run.config) for run in runs]
    keys = list(dict.fromkeys(key for flat in flats for key in flat))
    varying = []
    for key in keys:
        leaf = key.rsplit(".", 1)[-1]
        if key != OPTIMIZER_KEY and leaf in IDENTITY_LEAVES:
            continue
        if len({_key(flat.get(key)) for flat in flats}) > 1:
            varying.append(key)
    return varying


def _cells_from_runs(runs: list[Run]) -> list[Cell]:
    """One cell per run; baselines and quantized runs each get the fields that vary among themselves."""
    baselines = {run.path: _baseline_of(run) for run in runs}
    varying = {
        is_baseline: _varying_fields([run for run in runs if bool(baselines[run.path]) == is_baseline])
        for is_baseline in (False, True)
    }
    cells = []
    for run in runs:
        flat = flatten(run.config)
        baseline = baselines[run.path]
        assignment = {key: flat.get(key) for key in varying[bool(baseline)]}
        if baseline:
            assignment = {key: value for key, value in assignment.items() if not key.startswith("quant")}
        error = run.summary.get("error")
        cells.append(
            Cell(run.name, assignment, baseline, run.status, None if error is None else str(error), None, run)
        )
    return cells


def _match(name: str, matrix_dir: Path, runs: dict[Path, Run]) -> Run | None:
    for path, run in runs.items():
        if path.relative_to(matrix_dir).as_posix() == name:
            return run
    for run in runs.values():
        if name in (run.path.name, run.summary.get("name"), lookup(run.config, "name")):
            return run
    return None


def load_matrix(matrix_dir: str | Path) -> Matrix:
    """Read matrix.json (when present) and every run folder under ``matrix_dir``."""
    matrix_dir = Path(matrix_dir)
    runs = {path: load_run(path) for path in find_runs(matrix_dir) if path != matrix_dir}
    spec_path = matrix_dir / MATRIX_FILE
    if not spec_path.exists():
        if not runs:
            raise FileNotFoundError(f"{matrix_dir}: no {MATRIX_FILE} and no run folders")
        notes = [f"no {MATRIX_FILE}: cells are the run folders, grouped by the config fields that differ"]
        return Matrix(matrix_dir, _cells_from_runs(list(runs.values())), {}, notes)
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{spec_path}: not valid JSON ({error})") from None
    entries = spec.get("cells") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e.get("name") for e in entries):
        raise ValueError(f"{spec_path}: expected {{'cells': [{{'name': ..., ...}}, ...]}}")
    cells, matched, notes = [], set(), []
    base = spec["base"] if isinstance(spec.get("base"), dict) else {}
    for entry in entries:
        name = str(entry["name"])
        run = _match(name, matrix_dir, runs)
        if run is not None:
            matched.add(run.path)
        cells.append(Cell.from_record(entry, run, base))
    strays = sorted(path.relative_to(matrix_dir).as_posix() for path in runs if path not in matched)
    if strays:
        notes.append(f"run folders not listed in {MATRIX_FILE} (left out): {', '.join(strays)}")
    return Matrix(matrix_dir, cells, dict(spec.get("axes") or {}), notes)
