"""Strict JSON for every file altgrad writes: no ``NaN``/``Infinity`` literals, whole files atomic.

Python's ``json`` writes ``NaN`` and ``Infinity``, which other JSON readers (``jq``, JavaScript,
most databases) reject. Here a non-finite float becomes ``null`` (the measurement exists but has no
finite value; docs/run_folder.md says so), and a whole file is written to a temporary file in the
same folder and renamed into place, so a reader never sees half of one.

Example::

    >>> dumps_strict({"loss": float("nan"), "steps": [1.5, float("inf")]})
    '{"loss": null, "steps": [1.5, null]}'
    >>> write_json_atomic(run_dir / "summary.json", summary)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def strict(value: Any) -> Any:
    """``value`` with every non-finite float (also inside dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict(item) for item in value]
    return value


def dumps_strict(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``strict(value)``; raises ValueError rather than ever writing NaN."""
    return json.dumps(strict(value), allow_nan=False, **kwargs)


def write_json_atomic(path: str | Path, value: Any, indent: int | None = 2) -> Path:
    """Write ``value`` as strict JSON to ``path`` via a temporary file and a rename."""
    return write_text_atomic(path, dumps_strict(value, indent=indent) + "\n")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
