"""The HTML page the report is built on: inline style, escaped tables, embedded PNG figures.

Pure standard library and matplotlib's Figure: ``Page`` collects headings, notes, tables and
figures (each written as a PNG next to the page and embedded as a base64 data URI) and renders
one self-contained document.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from sensitivity.report import file_part

# Resolution of the report's figures (their PNGs are embedded in the page).
DPI = 100
# Value types in the activations' own units (any magnitude): significant digits, not decimals.
SCALED_KEYS = ("shapley", "mean_diff")

STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
figure { margin: 0.5em 0 1.5em; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
nav ul { columns: 2; } .note { color: #666; font-size: 0.9em; }
td small { color: #666; white-space: nowrap; }
"""


def escape(value: Any) -> str:
    """``str(value)`` escaped for HTML."""
    return html.escape(str(value))


def markup_table(header: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1) -> str:
    """An HTML table of cells given as markup (escaped by the caller); the first ``left``
    columns are left-aligned labels."""
    def cells(tag: str, values: Sequence[str]) -> str:
        return "".join(
            f'<{tag}{" class=l" if i < left else ""}>{v}</{tag}>' for i, v in enumerate(values)
        )
    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return f"<table><tr>{cells('th', header)}</tr>{body}</table>"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1) -> str:
    """An HTML table of plain values; the first ``left`` columns are left-aligned labels."""
    escaped = ([escape(v) for v in row] for row in rows)
    return markup_table([escape(h) for h in header], escaped, left)


def number(value: float, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, "n/a" when not finite."""
    return "n/a" if not np.isfinite(value) else f"{value:.{digits}f}"


def statistic(value: float, key: str) -> str:
    """A summary statistic of ``key`` (or its half-width): indices and effect sizes are
    dimensionless, three decimals; values in activation units, three significant digits."""
    if not np.isfinite(value):
        return "n/a"
    return f"{value:.3g}" if key.removesuffix("_conf") in SCALED_KEYS else f"{value:.3f}"


class Page:
    """Collects HTML parts and writes each figure as a PNG next to the page."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.parts: list[str] = []
        self.toc: list[tuple[str, str]] = []
        self.pngs: list[Path] = []
        self.sections = 0

    def heading(self, level: int, text: str) -> None:
        """Add an anchored heading; level-2 headings go into the table of contents."""
        self.sections += 1
        anchor = f"s{self.sections}"
        if level == 2:
            self.toc.append((anchor, text))
        self.parts.append(f'<h{level} id="{anchor}">{escape(text)}</h{level}>')

    def add(self, markup: str) -> None:
        """Add markup as given (escaped by the caller)."""
        self.parts.append(markup)

    def note(self, text: str) -> None:
        """Add a paragraph of plain text."""
        self.parts.append(f'<p class="note">{escape(text)}</p>')

    def figure(self, figure: Figure, name: str, caption: str) -> None:
        """Write ``figure`` as ``<name>.png`` and embed it as a data URI with its caption."""
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        data = buffer.getvalue()
        path = self.out_dir / f"{file_part(name)}.png"
        path.write_bytes(data)
        self.pngs.append(path)
        encoded = base64.b64encode(data).decode("ascii")
        self.parts.append(
            f'<figure><img src="data:image/png;base64,{encoded}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)} ({escape(path.name)})</figcaption></figure>"
        )

    def html(self, title: str) -> str:
        """The whole page: head, table of contents and the parts added so far."""
        toc = "".join(f'<li><a href="#{a}">{escape(t)}</a></li>' for a, t in self.toc)
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            # An empty icon: the browser requests no favicon, the page loads nothing else.
            f'<link rel="icon" href="data:,"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
            f"<nav><ul>{toc}</ul></nav>{''.join(self.parts)}</body></html>\n"
        )
