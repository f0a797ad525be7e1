"""Plots of a run directory: Pareto fronts, per-step training curves, cosines over training vs recovery.

Figures are drawn with matplotlib's Agg canvas directly (no pyplot, no global backend state), so
plotting works headless and from threads, and each PNG is written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from retainfirst.io import atomic_write
from retainfirst.report.pareto import compare_families, pareto_front
from retainfirst.report.scores import RunSummary

# Per-step quantities drawn by plot_training_curves, with their axis labels.
CURVE_METRICS: dict[str, str] = {
    "forget_loss": "forget loss",
    "retain_loss": "retain loss",
    "cos_forget_retain": "cos(g_f, g_r)",
    "cos_update_retain": "cos(update, g_r)",
    "cos_step_retain": "cos(weight change Δθ, g_r), < 0: retain loss falls",
    "cos_step_forget": "cos(weight change Δθ, g_f), < 0: forget loss falls",
    "conflict_fraction": "conflict fraction",
    "eval/forget": "forget score (in-run evaluation)",
}

# The cosines of plot_cos_vs_recovery: the synthesizer's update u and the optimizer's actual step.
RECOVERY_COSINES: dict[str, str] = {
    "cos_update_retain": "cos(update u, g_r)",
    "cos_step_retain": "cos(weight change Δθ, g_r), < 0: retain loss falls",
}


def _save(fig: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def _colors(labels: Iterable[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {label: cmap(i % 10) for i, label in enumerate(dict.fromkeys(labels))}


def _finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def plot_pareto(
    runs: Sequence[RunSummary],
    path: str | Path,
    before: RunSummary | None = None,
    title: str = "Forgetting vs utility",
) -> Path:
    """One point per run (colour = family), each family's front as a step line, the overall front dashed.

    x: forget score (lower = more forgotten), y: utility = mean recovery % of the retained metrics.
    """
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    points = [(r.forget_score, r.utility) for r in runs]
    families = [r.family for r in runs]
    colors = _colors(families)
    for fam in colors:
        xs = [p[0] for p, f in zip(points, families, strict=True) if f == fam and _finite(*p)]
        ys = [p[1] for p, f in zip(points, families, strict=True) if f == fam and _finite(*p)]
        ax.scatter(xs, ys, color=colors[fam], label=fam, zorder=3)
    if points:
        comparison = compare_families(points, families)
        for fam, front in comparison.fronts.items():
            if len(front) > 1:
                ax.step(
                    [points[i][0] for i in front],
                    [points[i][1] for i in front],
                    where="post",
                    color=colors[fam],
                    alpha=0.6,
                )
        overall = pareto_front(points)
        if overall:
            ax.plot(
                [points[i][0] for i in overall],
                [points[i][1] for i in overall],
                "k--",
                alpha=0.5,
                label="overall front",
                zorder=2,
            )
    for run, (x, y) in zip(runs, points, strict=True):
        if _finite(x, y):
            ax.annotate(run.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if before is not None and _finite(before.forget_score):
        ax.axvline(before.forget_score, color="grey", linestyle=":", label="before (forget score)")
    ax.set_xlabel("forget score (lower = more forgotten)")
    ax.set_ylabel("utility: mean recovery %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if runs or before is not None:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_training_curves(
    records: Iterable[Mapping[str, Any]],
    path: str | Path,
    metrics: Mapping[str, str] = CURVE_METRICS,
    title: str = "Training curves",
) -> Path:
    """Per-step curves of each run (``records``: metrics.jsonl lines with ``run`` and ``step``)."""
    by_run: dict[str, list[Mapping[str, Any]]] = {}
    for rec in records:
        by_run.setdefault(str(rec.get("run", "run")), []).append(rec)
    present = [m for m in metrics if any(_number(r.get(m)) for recs in by_run.values() for r in recs)]
    shown = present or list(metrics)[:1]
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    colors = _colors(by_run)
    for k, metric in enumerate(shown):
        ax = fig.add_subplot(rows, cols, k + 1)
        for run, recs in by_run.items():
            pairs = [
                (r.get("step", i), float(r[metric])) for i, r in enumerate(recs) if _number(r.get(metric))
            ]
            if pairs:
                xs, ys = zip(*sorted(pairs), strict=True)
                ax.plot(xs, ys, color=colors[run], label=run, linewidth=1.2)
        ax.set_title(metrics[metric], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if k == 0 and by_run:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def cosine_ranges(
    records: Iterable[Mapping[str, Any]], stats: Iterable[str] = RECOVERY_COSINES
) -> dict[str, dict[str, tuple[float, float]]]:
    """Per run (``run`` key of each metrics record) and stat: (mean, minimum) over its training steps.

    Steps without a finite value are left out; a run without any has no entry for that stat.
    """
    values: dict[str, dict[str, list[float]]] = {}
    wanted = list(stats)
    for rec in records:
        run = values.setdefault(str(rec.get("run", "run")), {})
        for stat in wanted:
            if _number(rec.get(stat)):
                run.setdefault(stat, []).append(float(rec[stat]))
    return {
        run: {stat: (math.fsum(xs) / len(xs), min(xs)) for stat, xs in per_stat.items()}
        for run, per_stat in values.items()
    }


def plot_cos_vs_recovery(
    runs: Sequence[RunSummary],
    path: str | Path,
    records: Iterable[Mapping[str, Any]] | None = None,
    title: str = "Cosines over training vs utility recovery",
) -> Path:
    """Does keeping the update (and the weight change) aligned with g_r predict how much utility survives?

    ``records``: the per-step metrics of every run (metrics.jsonl lines with a ``run`` key, as for
    :func:`plot_training_curves`). One panel per cosine in :data:`RECOVERY_COSINES`: each run is a
    dot at its mean over training and a triangle at its minimum, joined by a line, at its utility.
    A single step's value says little (a run can end positive after many negative steps). Without
    ``records`` (older callers) each run's last logged value is drawn instead.
    """
    return _save(cos_vs_recovery_figure(runs, records, title), path)


def cos_vs_recovery_figure(
    runs: Sequence[RunSummary], records: Iterable[Mapping[str, Any]] | None, title: str
) -> Figure:
    """The figure of :func:`plot_cos_vs_recovery` (one axes per cosine, in RECOVERY_COSINES order)."""
    if records is None:
        ranges = {
            r.name: {s: (r.final_stats[s], r.final_stats[s]) for s in RECOVERY_COSINES if s in r.final_stats}
            for r in runs
        }
    else:
        ranges = cosine_ranges(records)
    fig = Figure(figsize=(11.0, 4.6), layout="constrained")
    colors = _colors(r.family for r in runs)
    for k, (stat, label) in enumerate(RECOVERY_COSINES.items()):
        ax = fig.add_subplot(1, len(RECOVERY_COSINES), k + 1)
        for fam, color in colors.items():
            shown = False
            for run in runs:
                mean, low = ranges.get(run.name, {}).get(stat, (math.nan, math.nan))
                if run.family != fam or not _finite(mean, low, run.utility):
                    continue
                ax.plot([low, mean], [run.utility, run.utility], color=color, alpha=0.5, linewidth=1)
                ax.scatter(
                    [mean], [run.utility], color=color, marker="o", zorder=3, label=None if shown else fam
                )
                ax.scatter([low], [run.utility], color=color, marker="v", zorder=3)
                ax.annotate(
                    run.name, (mean, run.utility), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
                shown = True
        ax.axvline(0.0, color="grey", linestyle=":", linewidth=1)
        what = "last step" if records is None else "o mean, \u25bd minimum over training"
        ax.set_xlabel(f"{label} ({what})")
        ax.set_ylabel("utility: mean recovery %")
        ax.grid(alpha=0.3)
        if colors and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def plot_matched(
    points: Sequence[Mapping[str, Any]],
    path: str | Path,
    level: float | None = None,
    title: str = "Utility vs forgetting (mean and CI over probes and seeds)",
) -> Path:
    """One point per configuration with its CI on both axes; configurations of one curve (e.g.
    ``sum (alpha grid)``) joined by a line; hollow markers: did not reach the matched ``level``.

    ``points``: dicts with ``label``, ``curve``, ``reached`` and ``forget`` / ``utility`` as
    :meth:`~retainfirst.report.stats.Estimate.to_dict` (``mean``, ``low``, ``high``).
    """
    fig = Figure(figsize=(6.8, 4.8))
    ax = fig.add_subplot()
    colors = _colors(str(p["curve"]) for p in points)

    def error(estimate: Mapping[str, Any]) -> list[list[float]]:
        mean, low, high = estimate["mean"], estimate.get("low"), estimate.get("high")
        return [[mean - low if _finite(low) else 0.0], [high - mean if _finite(high) else 0.0]]

    for curve, color in colors.items():
        mine = [
            p for p in points if p["curve"] == curve and _finite(p["forget"]["mean"], p["utility"]["mean"])
        ]
        mine.sort(key=lambda p: p["forget"]["mean"])
        if len(mine) > 1:
            xs = [p["forget"]["mean"] for p in mine]
            ax.plot(xs, [p["utility"]["mean"] for p in mine], color=color, alpha=0.5, linewidth=1)
        for k, p in enumerate(mine):
            x, y = p["forget"]["mean"], p["utility"]["mean"]
            ax.errorbar(
                x,
                y,
                xerr=error(p["forget"]),
                yerr=error(p["utility"]),
                fmt="o",
                color=color,
                markerfacecolor=color if p.get("reached", True) else "white",
                capsize=3,
                label=curve if k == 0 else None,
                zorder=3,
            )
            ax.annotate(str(p["label"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if level is not None and _finite(level):
        ax.axvline(level, color="grey", linestyle="--", label=f"matched level {level:.3g}")
    ax.set_xlabel("forget score (lower = more forgotten)")
    ax.set_ylabel("utility: mean recovery %")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)
