"""The report of a run directory: metrics.jsonl, results.json, summary.md and the plots.

Scores come from the evaluation tasks' metadata (:mod:`retainfirst.report.scores`); this module
only gathers each sub-run's files and writes the directory-level outputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retainfirst.config import RunConfig, SubRun
from retainfirst.evals.results import EvalResult, load_results
from retainfirst.evals.tasks import get_tasks, task_classes
from retainfirst.experiment.console import PROG, print_report
from retainfirst.experiment.rundir import CONFIG_FILE
from retainfirst.io import atomic_write_json, atomic_write_text, json_safe, read_jsonl

# Differences the report treats as ties when comparing Pareto fronts: 0.02 ROUGE-L recall (about one
# probe in 50) and 1 point of utility recovery; below that, evaluation noise would decide the verdict.
VERDICT_MARGIN = (0.02, 1.0)


def final_stats(metrics_path: Path) -> dict[str, float]:
    """The numbers of the last training step (synthesis statistics, losses)."""
    records = read_jsonl(metrics_path)
    if not records:
        return {}
    last = records[-1]
    return {k: float(v) for k, v in last.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def describe_config(config: RunConfig, plan: Sequence[SubRun]) -> str:
    t = config.train
    return (
        f"Model `{config.model}` ({config.dtype}); data `{config.data.source}`; "
        f"forget loss `{t.forget_loss}` {t.forget_kwargs or ''}, retain loss `{t.retain_loss}`; "
        f"{t.steps} steps, lr {t.lr:g}, batch "
        f"{t.forget_batch_size}+{t.retain_batch_size} x {t.gradient_accumulation_steps}, alpha {t.alpha:g}, "
        f"gamma {t.gamma:g}; sub-runs: {', '.join(s.name for s in plan)}. "
        f"The full resolved configuration is in `{CONFIG_FILE}`."
    )


def write_report(
    out: Path,
    config: RunConfig,
    plan: Sequence[SubRun],
    before_results: list[EvalResult],
    *,
    title: str,
    rerun: str,
) -> dict[str, Any]:
    """Write the directory's report from ``before_results`` and each sub-run's files; the payload of
    results.json is returned (and the comparison table printed)."""
    from retainfirst.report import (
        RunSummary,
        compare_families,
        format_table,
        headline_catalogue,
        headline_metrics,
        plot_cos_vs_recovery,
        plot_pareto,
        plot_training_curves,
        summarize_run,
        write_summary_md,
    )

    tasks = get_tasks(config.eval.tasks)
    headlines = headline_catalogue(tasks)
    before_metrics = headline_metrics(before_results, tasks)
    before = RunSummary("before", "before", before_metrics, headlines=headlines)
    runs: list[RunSummary] = []
    merged: list[dict[str, Any]] = []
    per_run_results: dict[str, list[EvalResult]] = {}
    for sub in plan:
        run_dir = out / "runs" / sub.name
        results = load_results(run_dir / "results.json")
        per_run_results[sub.name] = results
        records = read_jsonl(run_dir / "metrics.jsonl")
        merged += [{"run": sub.name, "synthesizer": sub.family, **sub.settings, **r} for r in records]
        runs.append(
            summarize_run(
                sub.name,
                sub.family,
                before_metrics,
                results,
                final_stats(run_dir / "metrics.jsonl"),
                sub.settings,
                tasks=tasks,
            )
        )
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in merged))
    points = [(r.forget_score, r.utility) for r in runs]
    comparison = compare_families(points, [r.family for r in runs], margin=VERDICT_MARGIN)
    if any(math.isfinite(x) and math.isfinite(y) for x, y in points):
        verdict = comparison.verdict()
    else:
        verdict = (
            f"No forget score was measured (evaluate {' or '.join(forget_task_names())} to compare fronts)."
        )
    plots = {
        "Pareto front: forgetting vs utility": plot_pareto(runs, out / "pareto.png", before=before).name,
        "Per-step losses and cosines": plot_training_curves(merged, out / "training_curves.png").name,
        "Final cos(update, retain) vs utility recovery": plot_cos_vs_recovery(
            runs, out / "cos_vs_recovery.png"
        ).name,
    }
    payload = {
        "title": title,
        "model": config.model,
        "before": {"metrics": before_metrics, "results": [r.to_dict() for r in before_results]},
        "runs": [
            {**run.to_dict(), "results": [r.to_dict() for r in per_run_results[run.name]]} for run in runs
        ],
        "comparison": {
            "fronts": {fam: [runs[i].name for i in idx] for fam, idx in comparison.fronts.items()},
            "hypervolumes": comparison.hypervolumes,
            "dominance": [list(pair) for pair in comparison.dominance],
            "best": comparison.best,
            "verdict": verdict,
        },
    }
    atomic_write_json(out / "results.json", payload)
    rows = [before, *runs]
    write_summary_md(
        out / "summary.md",
        rows,
        title=title,
        description=describe_config(config, plan),
        verdict=verdict,
        plots=plots,
        rerun=rerun,
        headlines=headlines,
    )
    print_report(format_table(rows, title=title, headlines=headlines), verdict, out)
    return json_safe(payload)  # as written: NaN/inf become None


def forget_task_names() -> list[str]:
    """Registered tasks that measure forgetting (named in the "no forget score" verdict)."""
    return [
        cls.name
        for cls in task_classes()
        if not cls.parametrised and any(h.role == "forget" for h in cls().headlines())
    ]


def rerun_command(out: Path, sweep: bool, grid: Sequence[str]) -> str:
    command = f"{PROG} {'sweep' if sweep else 'run'} {out / CONFIG_FILE} --out NEW_DIR"
    return command + (" " + " ".join(grid) if sweep and grid else "")
