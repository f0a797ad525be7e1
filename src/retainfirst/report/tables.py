"""The comparison table of runs: rich for the terminal, Markdown for summary.md (same columns)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rich.table import Table
from rich.text import Text

from retainfirst.report.scores import RunSummary


@dataclass(frozen=True)
class Column:
    header: str
    kind: str  # "metric" | "recovery" | "score"
    key: str
    fmt: str


# Candidate columns in display order; only those with a value in some row are shown.
COLUMNS: tuple[Column, ...] = (
    Column("forget ↓", "metric", "forget", "{:.3f}"),
    Column("WMDP-bio ↓", "metric", "wmdp_bio", "{:.3f}"),
    Column("WMDP-cyber ↓", "metric", "wmdp_cyber", "{:.3f}"),
    Column("neighbor ↑", "metric", "neighbor", "{:.3f}"),
    Column("MMLU ↑", "metric", "mmlu", "{:.3f}"),
    Column("ppl ↓", "metric", "ppl", "{:.2f}"),
    Column("rec. neighbor %", "recovery", "neighbor", "{:.1f}"),
    Column("rec. MMLU %", "recovery", "mmlu", "{:.1f}"),
    Column("rec. ppl %", "recovery", "ppl", "{:.1f}"),
    Column("utility %", "score", "utility", "{:.1f}"),
    Column("cos(u,r)", "stat", "cos_update_retain", "{:.3f}"),
)


def _value(row: RunSummary, column: Column) -> float | None:
    if column.kind == "metric":
        return row.metrics.get(column.key)
    if column.kind == "recovery":
        return row.recovery.get(column.key)
    if column.kind == "stat":
        return row.final_stats.get(column.key)
    value = getattr(row, column.key)
    return None if isinstance(value, float) and math.isnan(value) else value


def _cell(row: RunSummary, column: Column) -> str:
    value = _value(row, column)
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return column.fmt.format(value)


def table_columns(rows: Sequence[RunSummary]) -> list[Column]:
    """The columns that have a value in at least one row."""
    return [c for c in COLUMNS if any(_value(r, c) is not None for r in rows)]


def table_cells(rows: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells (first column: run name) shared by the rich and Markdown tables."""
    columns = table_columns(rows)
    headers = ["run", *(c.header for c in columns)]
    cells = [[row.name, *(_cell(row, c) for c in columns)] for row in rows]
    return headers, cells


def format_table(rows: Sequence[RunSummary], title: str | None = None) -> Table:
    """A rich table comparing ``before`` and each run (print it with ``rich.console.Console``)."""
    headers, cells = table_cells(rows)
    table = Table(title=Text(title) if title else None, show_lines=False)
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=True)
    for line in cells:
        table.add_row(*(Text(cell) for cell in line))  # run names are data, not markup
    return table


def markdown_table(rows: Sequence[RunSummary]) -> str:
    """The same table in GitHub Markdown."""
    headers, cells = table_cells(rows)
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---", *("---:" for _ in headers[1:])]) + "|",
    ]
    lines += ["| " + " | ".join(line) + " |" for line in cells]
    return "\n".join(lines) + "\n"
