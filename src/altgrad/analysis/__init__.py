"""Read run folders and write reports: ``write_report(path)`` for a run or a matrix folder.

Example::

    >>> from altgrad.analysis import load_run, write_report
    >>> write_report("runs/matrix")                         # doctest: +SKIP
"""

from altgrad.analysis.failure import FailureFinding, classify_failure, write_analysis
from altgrad.analysis.matrix import Cell, Matrix, load_matrix
from altgrad.analysis.matrix_report import write_matrix_report
from altgrad.analysis.report import write_report
from altgrad.analysis.results import aggregate_over_seeds, results_table
from altgrad.analysis.run_report import write_run_report
from altgrad.analysis.runs import Run, find_runs, load_run
from altgrad.analysis.summaries import summarize_run

__all__ = [
    "Cell",
    "FailureFinding",
    "Matrix",
    "Run",
    "aggregate_over_seeds",
    "classify_failure",
    "find_runs",
    "load_matrix",
    "load_run",
    "results_table",
    "summarize_run",
    "write_analysis",
    "write_matrix_report",
    "write_report",
    "write_run_report",
]
