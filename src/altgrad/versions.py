"""What produced a run: the versions of altgrad, torch and Python, and altgrad's git commit.

``run_versions()`` is recorded in every run's ``summary.json`` under ``versions``; ``altgrad
--version`` prints the same. The commit is that of the git checkout holding the altgrad sources
(``None`` for an installed wheel, or when git is not there), with ``git_dirty`` telling whether
tracked files under the package folder differed from it.

Example::

    >>> run_versions()  # doctest: +SKIP
    {'altgrad': '0.1.0', 'torch': '2.13.0+cpu', 'python': '3.11.7', 'git_commit': '6a9d400...',
     'git_dirty': False}
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import altgrad

SOURCE_DIR = Path(altgrad.__file__).resolve().parent


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(
            ["git", "-C", str(SOURCE_DIR), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout holding altgrad's sources, or (None, None) outside one."""
    head = _git("rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        return None, None
    diff = _git("diff", "--quiet", "HEAD", "--", ".")
    return head.stdout.strip(), (None if diff is None else diff.returncode != 0)


def run_versions() -> dict[str, Any]:
    """``{"altgrad", "torch", "python", "git_commit", "git_dirty"}`` of this process."""
    commit, dirty = git_commit()
    return {
        "altgrad": altgrad.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def version_line() -> str:
    """One line for ``altgrad --version``."""
    versions = run_versions()
    commit = versions["git_commit"]
    where = f", git {commit[:12]}{' (modified)' if versions['git_dirty'] else ''}" if commit else ""
    return f"altgrad {versions['altgrad']} (torch {versions['torch']}, Python {versions['python']}{where})"
