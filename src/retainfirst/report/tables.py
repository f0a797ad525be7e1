"""The comparison table of runs: rich for the terminal, Markdown for summary.md (same columns)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rich.table import Table
from rich.text import Text

from retainfirst.evals.tasks import Headline
from retainfirst.report.scores import RunSummary, headline_catalogue


@dataclass(frozen=True)
class Column:
    header: str
    kind: str  # "metric" | "recovery" | "score"
    key: str
    fmt: str


def columns_for(headlines: Sequence[Headline]) -> list[Column]:
    """Candidate columns in display order: each headline number (forget, utility, diagnostic), the
    recovery of each utility number, the utility and the final cos(update, retain)."""
    metric = [
        Column(f"{h.title} {'↑' if h.higher_is_better else '↓'}", "metric", h.key, h.fmt) for h in headlines
    ]
    rec = [Column(f"rec. {h.title} %", "recovery", h.key, "{:.1f}") for h in headlines if h.role == "utility"]
    return [
        *metric,
        *rec,
        Column("utility %", "score", "utility", "{:.1f}"),
        Column("cos(u,r)", "stat", "cos_update_retain", "{:.3f}"),
    ]


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


def table_columns(rows: Sequence[RunSummary], headlines: Sequence[Headline] | None = None) -> list[Column]:
    """The columns that have a value in at least one row (``headlines``: default all registered tasks';
    a number no headline describes, e.g. from an unregistered task, gets a plain column at the end)."""
    headlines = list(headline_catalogue() if headlines is None else headlines)
    known = {h.key for h in headlines}
    extra = [k for r in rows for k in r.metrics if k not in known]
    headlines += [Headline(k, "diagnostic", k, True) for k in dict.fromkeys(extra)]
    return [c for c in columns_for(headlines) if any(_value(r, c) is not None for r in rows)]


def table_cells(
    rows: Sequence[RunSummary], headlines: Sequence[Headline] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells (first column: run name) shared by the rich and Markdown tables."""
    columns = table_columns(rows, headlines)
    headers = ["run", *(c.header for c in columns)]
    cells = [[row.name, *(_cell(row, c) for c in columns)] for row in rows]
    return headers, cells


def format_table(
    rows: Sequence[RunSummary], title: str | None = None, headlines: Sequence[Headline] | None = None
) -> Table:
    """A rich table comparing ``before`` and each run (print it with ``rich.console.Console``)."""
    headers, cells = table_cells(rows, headlines)
    table = Table(title=Text(title) if title else None, show_lines=False)
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=True)
    for line in cells:
        table.add_row(*(Text(cell) for cell in line))  # run names are data, not markup
    return table


def markdown_table(rows: Sequence[RunSummary], headlines: Sequence[Headline] | None = None) -> str:
    """The same table in GitHub Markdown."""
    headers, cells = table_cells(rows, headlines)
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---", *("---:" for _ in headers[1:])]) + "|",
    ]
    lines += ["| " + " | ".join(line) + " |" for line in cells]
    return "\n".join(lines) + "\n"
