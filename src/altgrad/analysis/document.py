"""A report as a list of blocks, written twice: report.md (PNGs under figures/) and a self-contained
report.html (the same PNGs embedded as base64 data URIs, inline CSS, no external resources).

Example::

    >>> doc = Document("E4M3 / adamw")                                   # doctest: +SKIP
    >>> doc.paragraph("Final val loss 3.21.")                            # doctest: +SKIP
    >>> doc.table(frame)                                                 # doctest: +SKIP
    >>> doc.figure(fig, "loss", "Train and val loss")                    # doctest: +SKIP
    >>> doc.write("runs/e4m3_adamw")   # -> runs/e4m3_adamw/report.html  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

MISSING = "—"
"""How a value that was not recorded (or is NaN) appears in tables."""
FIGURE_DPI = 110
CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #555; }
.note { color: #666; font-style: italic; }
""".strip()


def format_cell(value: Any) -> str:
    """A table value as text: floats to 4 significant digits, NaN/None as ``MISSING``."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return MISSING
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == int(value) and abs(value) >= 1e4:
            return f"{int(value):d}"
        return f"{value:.4g}"
    try:
        if pd.isna(value):
            return MISSING
    except (TypeError, ValueError):
        pass
    return str(value)


@dataclass
class _Block:
    kind: str  # heading, paragraph, note, table, figure
    text: str = ""
    level: int = 2
    frame: pd.DataFrame | None = None
    png: bytes = b""
    filename: str = ""


class Document:
    """Headings, paragraphs, tables and figures, in order, rendered to Markdown and HTML."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.blocks: list[_Block] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(_Block("heading", text, level=level))

    def paragraph(self, text: str) -> None:
        self.blocks.append(_Block("paragraph", text))

    def note(self, text: str) -> None:
        """A side remark, e.g. "not recorded in this run"."""
        self.blocks.append(_Block("note", text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(_Block("bullets", "\n".join(items)))

    def table(self, frame: pd.DataFrame) -> None:
        """A DataFrame as a table (the index is dropped; put labels in a column)."""
        self.blocks.append(_Block("table", frame=frame.reset_index(drop=True)))

    def figure(self, figure: Figure, name: str, caption: str) -> None:
        """Render a matplotlib figure to PNG now; it is saved as ``figures/{name}.png`` on ``write``."""
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
        self.blocks.append(_Block("figure", caption, png=buffer.getvalue(), filename=f"{name}.png"))

    def write(self, out_dir: str | Path) -> Path:
        """Write report.md, report.html and figures/*.png into ``out_dir``; return the HTML path."""
        out_dir = Path(out_dir)
        figures_dir = out_dir / "figures"
        figures_dir.mkdir(parents=True, exist_ok=True)
        for block in self.blocks:
            if block.kind == "figure":
                (figures_dir / block.filename).write_bytes(block.png)
        (out_dir / "report.md").write_text(self.markdown(), encoding="utf-8")
        html_path = out_dir / "report.html"
        html_path.write_text(self.html(), encoding="utf-8")
        return html_path

    def markdown(self) -> str:
        parts = [f"# {self.title}"]
        for block in self.blocks:
            if block.kind == "heading":
                parts.append(f"{'#' * block.level} {block.text}")
            elif block.kind == "paragraph":
                parts.append(block.text)
            elif block.kind == "note":
                parts.append(f"*{block.text}*")
            elif block.kind == "bullets":
                parts.append("\n".join(f"- {item}" for item in block.text.split("\n")))
            elif block.kind == "table":
                parts.append(_markdown_table(block.frame))
            elif block.kind == "figure":
                parts.append(f"![{block.text}](figures/{block.filename})\n\n*{block.text}*")
        return "\n\n".join(parts) + "\n"

    def html(self) -> str:
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(self.title)}</title>",
            f"<style>\n{CSS}\n</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
        ]
        for block in self.blocks:
            text = html.escape(block.text)
            if block.kind == "heading":
                parts.append(f"<h{block.level}>{text}</h{block.level}>")
            elif block.kind == "paragraph":
                parts.append(f"<p>{text}</p>")
            elif block.kind == "note":
                parts.append(f'<p class="note">{text}</p>')
            elif block.kind == "bullets":
                items = "".join(f"<li>{html.escape(item)}</li>" for item in block.text.split("\n"))
                parts.append(f"<ul>{items}</ul>")
            elif block.kind == "table":
                parts.append(_html_table(block.frame))
            elif block.kind == "figure":
                data = base64.b64encode(block.png).decode("ascii")
                parts.append(
                    f'<figure><img alt="{text}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{text}</figcaption></figure>"
                )
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"


def _markdown_table(frame: pd.DataFrame) -> str:
    header = [str(column) for column in frame.columns]
    rows = [
        [format_cell(value).replace("|", "\\|") for value in row] for row in frame.itertuples(index=False)
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(frame: pd.DataFrame) -> str:
    header = "".join(f"<th>{html.escape(str(column))}</th>" for column in frame.columns)
    rows = [
        "<tr>" + "".join(f"<td>{html.escape(format_cell(value))}</td>" for value in row) + "</tr>"
        for row in frame.itertuples(index=False)
    ]
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
