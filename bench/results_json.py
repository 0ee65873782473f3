"""Where a benchmark writes its JSON: ``--json PATH``, by default ``bench/results/<name>.json``
(bench/results/ is git-ignored). Every benchmark in this folder takes it.

    >>> add_json_argument(parser, "train_step")        # doctest: +SKIP
    >>> write_results(args.json, {"rows": rows})       # doctest: +SKIP
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from altgrad.jsonio import write_json_atomic

RESULTS = Path(__file__).parent / "results"


def add_json_argument(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--json", type=Path, default=RESULTS / f"{name}.json", help="where the JSON goes")


def write_results(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` to ``path`` atomically (its folder created) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    print(f"wrote {path}")
