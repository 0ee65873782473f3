"""The snippets of README's "Use it in your own training" run as written, on a tiny random-init GPT-2
(``model``) and random token windows (``train_dataset``), in a temporary working directory."""

import math
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from integrations.reference import tiny_gpt2, token_dataset  # noqa: E402

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "## Use it in your own training"
SNIPPETS = {  # name: (the package it needs, a text it holds)
    "hf": ("accelerate", "altgrad.integrations.hf"),
    "lightning": ("lightning", "altgrad.integrations.lightning"),
    "plain_loop": ("torch", "attach_flip_tracker"),
}


def snippets() -> list[str]:
    section = README.read_text().split(f"\n{HEADING}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_holds_the_three_snippets_in_order():
    found = snippets()
    assert len(found) == len(SNIPPETS)
    for code, (_, marker) in zip(found, SNIPPETS.values(), strict=True):
        assert marker in code


@pytest.mark.parametrize("index, name", enumerate(SNIPPETS), ids=list(SNIPPETS))
def test_snippet_runs_and_prints_finite_figures(index, name, tmp_path, monkeypatch, capsys):
    pytest.importorskip(SNIPPETS[name][0])
    monkeypatch.chdir(tmp_path)
    namespace = {"model": tiny_gpt2(), "train_dataset": token_dataset(160)}
    exec(compile(snippets()[index], f"README snippet {name}", "exec"), namespace)

    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    figures = [float(value) for value in re.findall(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", last_line)]
    assert figures and all(math.isfinite(value) for value in figures), last_line
