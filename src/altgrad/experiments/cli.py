"""``altgrad matrix GRID.yaml [--jobs N] [--shard K/N] [--cell NAME] [--list [--json]]``: the argparse
wiring for the experiment runner.

The main CLI calls ``register(subparsers)``; the handler returns the exit code (1 if a cell failed,
130/143 when SIGINT/SIGTERM stopped the matrix).

Example::

    $ altgrad matrix experiments/quick.yaml --jobs 2
    $ altgrad matrix experiments/quick.yaml --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT
    $ altgrad matrix experiments/quick.yaml --list --json
    $ altgrad report runs/quick
"""

from __future__ import annotations

import argparse
import json
import sys

from altgrad.training.interrupt import exit_code

from .grid import load_grid
from .runner import cell_status, parse_shard, run_matrix, select_cells


def _cmd_list(args: argparse.Namespace) -> int:
    grid = load_grid(args.grid)
    cells = [cell_status(grid.cells[i]) for i in select_cells(grid, args.shard, args.cell)]
    if args.json:
        print(json.dumps(cells, indent=1))
        return 0
    width = max((len(cell["name"]) for cell in cells), default=0)
    for cell in cells:
        print(f"{cell['name'].ljust(width)}  {cell['status']:<9}  {cell['plan']}")
    return 0


def _cmd_matrix(args: argparse.Namespace) -> int:
    if args.json and not args.list:
        raise ValueError("--json goes with --list (altgrad matrix GRID --list --json)")
    args.shard = parse_shard(args.shard) if args.shard else None
    if args.list:
        return _cmd_list(args)
    result = run_matrix(args.grid, jobs=args.jobs, dry_run=args.dry_run, shard=args.shard, cells=args.cell)
    if args.dry_run:
        return 0
    print(
        f"matrix folder: {result.matrix_dir}  ({result.completed} completed, {result.failed} failed, "
        f"{result.skipped} already finished; cell status in {result.matrix_dir / 'matrix.json'})"
    )
    for record in result.cells:
        if record["status"] == "failed":
            print(f"  failed: {record['name']}: {record['error']}")
    for name, why in result.elsewhere.items():
        print(f"  not run here: {name}: {why}")
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
    matrix.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run N cells in parallel processes (worker k on GPU k mod GPUs)",
    )
    matrix.add_argument("--dry-run", action="store_true", help="print the expanded cells and run nothing")
    matrix.add_argument(
        "--shard", metavar="K/N",
        help="run cells K, K+N, K+2N, ... (K 0-based; Slurm: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)",
    )  # fmt: skip
    matrix.add_argument("--cell", action="append", metavar="NAME", help="run only this cell (repeatable)")
    matrix.add_argument("--list", action="store_true", help="print the cells and their status; run nothing")
    matrix.add_argument(
        "--json", action="store_true", help="with --list: as JSON (name, assignment, status...)"
    )
    matrix.set_defaults(handler=_cmd_matrix)
