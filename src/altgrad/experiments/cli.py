"""``altgrad matrix GRID.yaml [--jobs N | --engine ray [--address A]] [--shard K/N] [--cell NAME]
[--list [--json]]``: the argparse wiring for the experiment runner.

The main CLI calls ``register(subparsers)``; the handler returns the exit code (1 if a cell failed,
130/143 when SIGINT/SIGTERM stopped the matrix).

Example::

    $ altgrad matrix experiments/quick.yaml --jobs 2
    $ altgrad matrix experiments/quick.yaml --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT
    $ altgrad matrix experiments/quick.yaml --list --json
    $ altgrad matrix experiments/quick.yaml --engine ray --address head-node:6379 --gpus-per-cell 1
    $ altgrad report runs/quick
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from altgrad.training.interrupt import exit_code

from .grid import load_grid
from .runner import cell_status, parse_shard, run_matrix, select_cells

if TYPE_CHECKING:
    from .ray_engine import RayEngine


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


def _engine(args: argparse.Namespace) -> RayEngine | None:
    """The engine the options ask for: None for the local pool (``--jobs``), else a ``RayEngine``."""
    ray_options = {"--address": args.address, "--cpus-per-cell": args.cpus_per_cell,
                   "--gpus-per-cell": args.gpus_per_cell}  # fmt: skip
    if args.engine == "local":
        given = [option for option, value in ray_options.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} go with --engine ray")
        return None
    if args.jobs != 1:
        raise ValueError(
            "--jobs is the local engine's; with --engine ray set --cpus-per-cell/--gpus-per-cell"
        )
    from .ray_engine import RayEngine

    cpus = 1 if args.cpus_per_cell is None else args.cpus_per_cell
    gpus = 0 if args.gpus_per_cell is None else args.gpus_per_cell
    try:
        return RayEngine(args.address, cpus, gpus)
    except ImportError as error:  # a user error: one line, no traceback
        raise ValueError(str(error)) from None


def _cmd_matrix(args: argparse.Namespace) -> int:
    if args.json and not args.list:
        raise ValueError("--json goes with --list (altgrad matrix GRID --list --json)")
    args.shard = parse_shard(args.shard) if args.shard else None
    if args.list:
        return _cmd_list(args)
    engine = _engine(args) if not args.dry_run else None
    result = run_matrix(
        args.grid, jobs=args.jobs, dry_run=args.dry_run, shard=args.shard, cells=args.cell, engine=engine
    )
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
    matrix.add_argument(
        "--engine", choices=("local", "ray"), default="local",
        help="local: processes on this machine (--jobs); ray: a Ray task per cell (altgrad[ray])",
    )  # fmt: skip
    matrix.add_argument(
        "--address",
        help="with --engine ray: an existing Ray cluster (default RAY_ADDRESS, else a local instance)",
    )
    matrix.add_argument(
        "--cpus-per-cell", type=float, metavar="N", help="with --engine ray: CPUs a cell asks for (1)"
    )
    matrix.add_argument(
        "--gpus-per-cell", type=float, metavar="N", help="with --engine ray: GPUs a cell asks for (0)"
    )
    matrix.set_defaults(handler=_cmd_matrix)
