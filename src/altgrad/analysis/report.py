"""One entry point for reports: a run folder gets a run report, a matrix folder a matrix report.

Example::

    >>> write_report("runs/e4m3_adamw")   # a run folder    -> runs/e4m3_adamw/report.html  # doctest: +SKIP
    >>> write_report("runs/matrix")       # a matrix folder -> runs/matrix/report.html      # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import yaml

from altgrad.analysis.matrix import MATRIX_FILE
from altgrad.analysis.matrix_report import write_matrix_report
from altgrad.analysis.run_report import write_run_report
from altgrad.analysis.runs import find_runs, is_run_dir, render_value

MODEL_DEFAULTS = {"source": "altgrad", "hf_config": None, "factory": None}
"""``model`` keys added after the first runs were written, with the value such a run had."""
MODELS_LISTED = 3
NAMES_LISTED = 3


def _first_names(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_LISTED])
    return shown + (f" (+{len(names) - NAMES_LISTED} more)" if len(names) > NAMES_LISTED else "")


def refuse_mixed_models(root: Path, runs: list[Path]) -> None:
    """Raise ValueError (one line) when the runs under ``root`` trained different models.

    Losses of different model sizes are not one comparison; a grid (matrix.json) that varies
    ``model.*`` on purpose is not checked. A run without a readable config.yaml is left out."""
    models: dict[str, list[str]] = {}
    for run in runs:
        try:
            config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(config, dict) and isinstance(config.get("model"), dict):
            model = MODEL_DEFAULTS | config["model"]  # runs written before a model key existed
            models.setdefault(render_value(dict(sorted(model.items()))), []).append(run.name)
    if len(models) > 1:
        kinds = "; ".join(
            f"{_first_names(names)}: {model}" for model, names in list(models.items())[:MODELS_LISTED]
        )
        if len(models) > MODELS_LISTED:
            kinds += f"; and {len(models) - MODELS_LISTED} more"
        raise ValueError(
            f"{root}: runs of {len(models)} different models cannot share one report ({kinds}); "
            "report each run folder on its own or move the runs into separate folders"
        )


def write_report(path: str | Path) -> Path:
    """Write the report for ``path`` and return the path of its report.html.

    ``path`` is a matrix folder when it holds matrix.json, a run folder when it holds config.yaml or
    metrics.jsonl, and otherwise a matrix folder when run folders lie under it.
    Raises FileNotFoundError when it is none of these, ValueError when loose run folders (no
    matrix.json) trained different models.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    if (path / MATRIX_FILE).is_file():
        return write_matrix_report(path)
    if is_run_dir(path):
        return write_run_report(path)
    if runs := find_runs(path):
        refuse_mixed_models(path, runs)
        return write_matrix_report(path)
    raise FileNotFoundError(
        f"{path}: neither a run folder (config.yaml, metrics.jsonl) nor a matrix folder "
        f"({MATRIX_FILE} or run folders under it)"
    )
