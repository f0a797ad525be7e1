"""Does the synthesizer's guarantee survive the optimizer?

``pcgrad`` and ``sago`` guarantee cos(u, g_r) >= 0 for the update u they hand to the optimizer, but
AdamW's first moment carries earlier (forget-dominated) gradients into the actual weight change
Δθ, and its second moment rescales each coordinate. The engine logs both cosines every step
(``cos_update_retain`` for u, ``cos_step_retain`` for Δθ = θ_after - θ_before); this module
summarises them per configuration over all steps of all its runs: mean, minimum and the share of
steps below zero.

The optimizer *subtracts* its step, so the weight-level counterpart of cos(u, g_r) >= 0 is
cos(-Δθ, g_r) >= 0 (to first order the retain loss does not rise: L_r changes by <g_r, Δθ>). The
table therefore shows cos(-Δθ, g_r) = -cos_step_retain, with the same sign convention as cos(u, g_r).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# (metrics.jsonl key, label, sign): the cosine the synthesizer guarantees, and the descent direction
# -Δθ of the weight change (both >= 0 when retention is not harmed, to first order).
COSINES: tuple[tuple[str, str, float], ...] = (
    ("cos_update_retain", "cos(u, g_r)", 1.0),
    ("cos_step_retain", "cos(-Δθ, g_r)", -1.0),
)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def cosine_summary(values: Iterable[Any]) -> dict[str, float | int | None]:
    """Mean, minimum, number of steps and share of steps below zero of the finite ``values``."""
    finite = [float(v) for v in values if _finite(v)]
    if not finite:
        return {"steps": 0, "mean": None, "min": None, "negative_share": None}
    return {
        "steps": len(finite),
        "mean": sum(finite) / len(finite),
        "min": min(finite),
        "negative_share": sum(v < 0 for v in finite) / len(finite),
    }


def guarantee_rows(
    configurations: Sequence[tuple[str, Sequence[str]]],
    records: Mapping[str, Sequence[Mapping[str, Any]]],
) -> list[dict[str, Any]]:
    """One row per configuration (label, its run names): each cosine's summary over every training
    step of its runs (in-run evaluation records without the cosine are skipped); the step cosine is
    reported for -Δθ (see the module docstring), under its metrics.jsonl key."""
    rows = []
    for label, runs in configurations:
        steps = [r for run in runs for r in records.get(run, [])]
        summaries = {
            key: cosine_summary(sign * r[key] if _finite(r.get(key)) else None for r in steps)
            for key, _, sign in COSINES
        }
        rows.append({"label": label, **summaries})
    return rows


def _cell(summary: Mapping[str, Any]) -> str:
    if not summary.get("steps"):
        return "– | – | –"
    return f"{summary['mean']:+.3f} | {summary['min']:+.3f} | {100 * summary['negative_share']:.0f} %"


def guarantee_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: per configuration, mean / minimum / share of negative steps of both cosines."""
    header = " | ".join(f"{label} mean | {label} min | {label} < 0" for _, label, _ in COSINES)
    lines = [
        f"| configuration | steps | {header} |",
        "|---|---:|" + "---:|" * (3 * len(COSINES)),
    ]
    for row in rows:
        steps = max(int(row[key].get("steps") or 0) for key, _, _ in COSINES)
        cells = " | ".join(_cell(row[key]) for key, _, _ in COSINES)
        lines.append(f"| {row['label']} | {steps} | {cells} |")
    return "\n".join(lines) + "\n"
