"""summary.md: the human-readable record of a run directory (table, verdict, plots, how to rerun)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from retainfirst.io import atomic_write_text
from retainfirst.report.scores import RunSummary
from retainfirst.report.tables import markdown_table

METRIC_NOTES = (
    "- **forget**: mean ROUGE-L recall of greedy answers over all forget probes (lower = more forgotten).\n"
    "- **neighbor**: the same over neighbor probes (facts that must be kept).\n"
    "- **MMLU**: accuracy on the fixed MMLU subset; **ppl**: perplexity on held-out general text.\n"
    "- **rec. X %**: after/before of each retained metric (before/after for ppl); "
    "**utility %**: their mean.\n"
    "- **cos(u,r)**: cosine between the final update and the retain gradient at the last step.\n"
)


def write_summary_md(
    path: str | Path,
    rows: Sequence[RunSummary],
    *,
    title: str = "retainfirst run",
    description: str = "",
    verdict: str | None = None,
    plots: Mapping[str, str] | None = None,
    rerun: str | None = None,
) -> Path:
    """Write summary.md atomically. ``rows``: the ``before`` row first, then each run.

    ``plots`` maps a caption to a file name relative to the summary; ``rerun`` is the command that
    reproduces the directory.
    """
    parts = [f"# {title}\n"]
    if description:
        parts.append(description.rstrip() + "\n")
    parts.append("## Results\n")
    parts.append(markdown_table(rows) if rows else "_no results_\n")
    parts.append(METRIC_NOTES)
    if verdict:
        parts.append("## Which family's front dominates?\n")
        parts.append(verdict.rstrip() + "\n")
    if plots:
        parts.append("## Plots\n")
        parts.extend(f"![{caption}]({file})\n" for caption, file in plots.items())
    if rerun:
        parts.append("## Reproduce\n")
        parts.append(f"```bash\n{rerun}\n```\n")
    return atomic_write_text(path, "\n".join(parts))
