"""``altgrad matrix GRID.yaml [--jobs N] [--dry-run]``: the argparse wiring for the experiment runner.

The main CLI calls ``register(subparsers)``; the handler returns the exit code (1 if a cell failed,
130/143 when SIGINT/SIGTERM stopped the matrix).

Example::

    $ altgrad matrix experiments/quick.yaml --jobs 2
    $ altgrad report runs/quick
"""

from __future__ import annotations

import argparse
import sys

from altgrad.training.interrupt import exit_code

from .runner import run_matrix


def _cmd_matrix(args: argparse.Namespace) -> int:
    result = run_matrix(args.grid, jobs=args.jobs, dry_run=args.dry_run)
    if args.dry_run:
        return 0
    print(
        f"matrix folder: {result.matrix_dir}  ({result.completed} completed, {result.failed} failed, "
        f"{result.skipped} already finished; cell status in {result.matrix_dir / 'matrix.json'})"
    )
    for record in result.cells:
        if record["status"] == "failed":
            print(f"  failed: {record['name']}: {record['error']}")
    if result.interrupted_by:
        left = sum(record["status"] == "pending" for record in result.cells)
        print(
            f"altgrad: matrix interrupted by {result.interrupted_by}; {left} cells left; run "
            f"`altgrad matrix {args.grid}` again to pick up where it was",
            file=sys.stderr,
        )
        return exit_code(result.interrupted_by)
    print(f"build the report with: altgrad report {result.matrix_dir}")
    return 1 if result.failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``matrix`` subcommand to the ``altgrad`` parser's subcommands."""
    matrix = subparsers.add_parser("matrix", help="run an experiment grid of training runs (cells)")
    matrix.add_argument("grid", help="a grid YAML file (see experiments/ and TEST_MATRIX.md)")
    matrix.add_argument("--jobs", type=int, default=1, metavar="N", help="run N cells in parallel processes")
    matrix.add_argument("--dry-run", action="store_true", help="print the expanded cells and run nothing")
    matrix.set_defaults(handler=_cmd_matrix)
