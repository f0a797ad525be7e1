"""summary.md: the human-readable record of a run directory (table, verdict, plots, how to rerun)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from retainfirst.evals.tasks import Headline
from retainfirst.io import atomic_write_text
from retainfirst.report.scores import RunSummary, headline_catalogue
from retainfirst.report.tables import markdown_table

GENERAL_NOTES = (
    "- **rec. X %**: after/before of each retained number (before/after where lower is better); "
    "**utility %**: their mean.\n"
    "- **cos(u,r)**: cosine between the final update and the retain gradient at the last step.\n"
)


def metric_notes(rows: Sequence[RunSummary], headlines: Sequence[Headline] | None = None) -> str:
    """One line per headline number shown (from the tasks' descriptions), then the derived columns."""
    shown = [
        h
        for h in (headline_catalogue() if headlines is None else headlines)
        if h.description and any(h.key in r.metrics for r in rows)
    ]
    return "".join(f"- **{h.title}**: {h.description}.\n" for h in shown) + GENERAL_NOTES


def write_summary_md(
    path: str | Path,
    rows: Sequence[RunSummary],
    *,
    title: str = "retainfirst run",
    description: str = "",
    verdict: str | None = None,
    plots: Mapping[str, str] | None = None,
    rerun: str | None = None,
    headlines: Sequence[Headline] | None = None,
    matched: Sequence[Mapping[str, Any]] | None = None,
    protocol: str | None = None,
    guarantee: str | None = None,
) -> Path:
    """Write summary.md atomically. ``rows``: the ``before`` row first, then each run.

    ``plots`` maps a caption to a file name relative to the summary; ``rerun`` is the command that
    reproduces the directory; ``headlines``: the run's tasks' numbers (default: all registered);
    ``matched``: each configuration's estimates at the matched level (see :func:`matched_table`);
    ``protocol``: one paragraph on how the numbers were made (probe counts, seeds, stopping rule);
    ``guarantee``: the table of cos(u, g_r) and cos(Δθ, g_r) over training (report.guarantee).
    """
    parts = [f"# {title}\n"]
    if description:
        parts.append(description.rstrip() + "\n")
    parts.append("## Results\n")
    parts.append(markdown_table(rows, headlines) if rows else "_no results_\n")
    parts.append(metric_notes(rows, headlines))
    if matched:
        parts.append("## At matched forgetting\n")
        parts.append(matched_table(matched))
    if verdict:
        parts.append("## Verdict\n")
        parts.append(verdict.rstrip() + "\n")
    if guarantee:
        parts.append("## The guarantee after the optimizer\n")
        parts.append(
            "cos(u, g_r): the synthesized update against the retain gradient (what pcgrad and sago "
            "guarantee to be >= 0); cos(-Δθ, g_r): the actual weight change (after clipping and AdamW's "
            "moments; the optimizer subtracts its step, so -Δθ is the comparable direction) against the "
            "same retain gradient; >= 0 means the step does not raise the retain loss to first order. "
            "Over every training step of the configuration's runs.\n"
        )
        parts.append(guarantee)
    if protocol:
        parts.append("## Evaluation protocol\n")
        parts.append(protocol.rstrip() + "\n")
    if plots:
        parts.append("## Plots\n")
        parts.extend(f"![{caption}]({file})\n" for caption, file in plots.items())
    if rerun:
        parts.append("## Reproduce\n")
        parts.append(f"```bash\n{rerun}\n```\n")
    return atomic_write_text(path, "\n".join(parts))


def _with_interval(estimate: Mapping[str, Any], fmt: str) -> str:
    mean, low, high = estimate.get("mean"), estimate.get("low"), estimate.get("high")
    if not isinstance(mean, int | float) or mean != mean:
        return "–"
    text = fmt.format(mean)
    return text + (
        f" [{fmt.format(low)}, {fmt.format(high)}]" if low is not None and high is not None else ""
    )


def matched_table(points: Sequence[Mapping[str, Any]]) -> str:
    """One row per configuration: seeds, whether it reached the level, forget score and utility with CI."""
    lines = [
        "| configuration | curve | seeds | reached level | forget score ↓ [CI] | utility % ↑ [CI] |",
        "|---|---|---:|---|---:|---:|",
    ]
    for p in points:
        steps = [o.get("step") for o in p.get("outcomes", []) if o.get("step") is not None]
        reached = (
            ("yes" + (f" (step {', '.join(map(str, steps))})" if steps else "")) if p["reached"] else "no"
        )
        lines.append(
            f"| {p['label']} | {p['curve']} | {len(p['runs'])} | {reached} | "
            f"{_with_interval(p['forget'], '{:.3f}')} | {_with_interval(p['utility'], '{:.1f}')} |"
        )
    return "\n".join(lines) + "\n"
