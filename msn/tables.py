"""Markdown tables: the one writer behind every printed or saved table (the low-shot table of
``msn.eval.report``, the benchmark pages, the fine-tuning and showcase reports).

A table is a header row, a rule and one line per row, each cell separated by `` | ``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]], padded: bool = False) -> str:
    """The lines of a table of ``rows`` (cells already text) under ``header``.

    Unpadded, the rule is ``|---|`` per column; ``padded`` left-justifies every column to its
    widest cell and draws the rule to that width (easier to read as plain text).
    """
    rows = [list(row) for row in rows]
    if padded:
        widths = [max(len(title), *(len(row[i]) for row in rows)) if rows else len(title)
                  for i, title in enumerate(header)]
        rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
        fit = lambda cells: [cell.ljust(width) for cell, width in zip(cells, widths)]  # noqa: E731
    else:
        rule = "|" + "---|" * len(header)
        fit = list
    line = lambda cells: "| " + " | ".join(fit(cells)) + " |"  # noqa: E731
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def number_cell(value: Any) -> str:
    """A measured value as the benchmark pages print it: ``-`` for none, a float to three
    significant digits below 1000 and as a whole number with thousands separators from 1000."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def records_table(records: Iterable[Mapping[str, Any]], columns: Sequence[str], titles: Sequence[str] | None = None,
                  cell: Callable[[Any], str] = number_cell) -> str:
    """A table of ``records`` (dicts): the values of the keys ``columns`` (a missing key reads
    as none), headed ``titles`` (default: the keys), each value written by ``cell``."""
    return markdown_table(list(titles or columns), ([cell(record.get(key)) for key in columns] for record in records))
