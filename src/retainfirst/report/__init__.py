"""Reports of run directories: comparison tables, summary.md, Pareto and training-curve plots."""

from retainfirst.io import atomic_write, atomic_write_json, atomic_write_text
from retainfirst.report.guarantee import guarantee_rows, guarantee_table
from retainfirst.report.pareto import (
    FamilyComparison,
    compare_families,
    dominates,
    front_dominates,
    hypervolume,
    pareto_front,
)
from retainfirst.report.plots import plot_cos_vs_recovery, plot_matched, plot_pareto, plot_training_curves
from retainfirst.report.scores import (
    RunSummary,
    forget_score,
    headline_catalogue,
    headline_metrics,
    recovery,
    summarize_run,
    utility,
)
from retainfirst.report.summary import write_summary_md
from retainfirst.report.tables import format_table, markdown_table

__all__ = [
    "FamilyComparison",
    "RunSummary",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "compare_families",
    "dominates",
    "forget_score",
    "format_table",
    "front_dominates",
    "guarantee_rows",
    "guarantee_table",
    "headline_catalogue",
    "headline_metrics",
    "hypervolume",
    "markdown_table",
    "pareto_front",
    "plot_cos_vs_recovery",
    "plot_matched",
    "plot_pareto",
    "plot_training_curves",
    "recovery",
    "summarize_run",
    "utility",
    "write_summary_md",
]
