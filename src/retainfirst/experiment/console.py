"""Console output of experiments: progress lines on stderr, tables on stdout (rich)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "retainfirst"


def say(message: str) -> None:
    """One progress line on stderr, prefixed with the program name."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold cyan]{PROG}[/] {escape(message)}")


def stdout_console() -> Any:
    """A console for tables; wide when stdout is a file or pipe, so columns are never truncated."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def print_report(table: Any, verdict: str | None, out: Path) -> None:
    """The comparison table of a run directory, its verdict and where the report is."""
    console = stdout_console()
    console.print(table)
    if verdict:
        console.print(verdict, markup=False)
    console.print(f"report written to {out}", markup=False)


def print_eval_results(results: Sequence[Any], title: str, path: Path) -> None:
    """One row per evaluation result (task, n, finite metrics) and where they were written."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title))
    for column in ("task", "n", "metrics"):
        table.add_column(column)
    for r in results:
        shown = ", ".join(
            f"{k}={v:.4g}" for k, v in r.metrics.items() if isinstance(v, float) and math.isfinite(v)
        )
        table.add_row(escape(r.task), str(r.n), shown)
    console = stdout_console()
    console.print(table)
    console.print(f"results written to {path}", markup=False)
