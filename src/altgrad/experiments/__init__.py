"""Experiment grids: expand format x optimizer x layer rule x seed into named cells, run and resume them."""

from .grid import Cell, Grid, GridError, expand_grid, load_grid
from .runner import MatrixResult, describe_grid, plan_cell, run_matrix, train_cell, write_matrix_json

__all__ = [
    "Cell", "Grid", "GridError", "MatrixResult", "describe_grid", "expand_grid", "load_grid", "plan_cell",
    "run_matrix", "train_cell", "write_matrix_json",
]  # fmt: skip
