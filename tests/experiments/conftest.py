"""Fixtures shared by the experiment tests."""

from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture
def fakes(monkeypatch):
    """The fake trainer, imported from a module that spawned workers can import too."""
    monkeypatch.syspath_prepend(str(HERE))
    import matrix_fakes

    return matrix_fakes
