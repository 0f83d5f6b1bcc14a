"""Markdown tables: the one place their syntax is written.

Every report (plan, bench, eval, studies, doctor) prints markdown tables; they are built
here so each has the same separators and alignment row, and a cell that holds a `|` (an
error message) cannot break its table. `markdown_header` and `markdown_row` are for a
caller that prints each row as soon as it is measured, so a cut-short run keeps them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

_RULE = {"l": "---", "r": "--:"}


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_row(cells: Sequence[object], columns: int | None = None) -> str:
    """One row: "| a | b |". With `columns`, a row of another width is a ValueError."""
    if columns is not None and len(cells) != columns:
        raise ValueError(f"table row has {len(cells)} cells, the header {columns}: {list(cells)!r}")
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def markdown_header(headers: Sequence[str], align: str | Sequence[str] | None = None) -> list[str]:
    """The header line and the alignment row; `align`: "l" or "r" per column (default all "l")."""
    align = "l" * len(headers) if align is None else align
    if len(align) != len(headers) or any(a not in _RULE for a in align):
        raise ValueError(f"align {align!r}: one 'l' or 'r' per column of {list(headers)!r}")
    return [markdown_row(headers), "|" + "|".join(_RULE[a] for a in align) + "|"]


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]],
                   align: str | Sequence[str] | None = None) -> list[str]:
    """The table's lines (header, alignment row, one line per row); cells are str()-ed."""
    return markdown_header(headers, align) + [markdown_row(r, len(headers)) for r in rows]
