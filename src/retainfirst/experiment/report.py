"""The report of a run directory: metrics.jsonl, results.json, summary.md and the plots.

Scores come from the evaluation tasks' metadata (:mod:`retainfirst.report.scores`); this module
only gathers each sub-run's files and writes the directory-level outputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from retainfirst.config import RunConfig, SubRun
from retainfirst.evals.results import EvalResult, load_results
from retainfirst.evals.tasks import Headline, get_tasks, task_classes
from retainfirst.experiment.console import PROG, print_report
from retainfirst.experiment.during_training import EvidenceSettings
from retainfirst.experiment.rundir import CONFIG_FILE
from retainfirst.io import atomic_write_json, atomic_write_text, json_safe, read_jsonl
from retainfirst.report.matched import Configuration, common_level, group_configurations, outcome
from retainfirst.report.stats import (
    Comparison,
    Measurement,
    compare,
    comparison_sentence,
    estimate,
    item_scores,
    measure,
    with_holm,
)

ITEMS_FILE = "items.json"  # per sub-run: per-item scores of each result (results.json keeps no samples)
BASELINE = "sum"  # the loss-weighting family every other synthesizer is compared with

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


def save_items(results: Sequence[EvalResult], path: Path) -> Path:
    """Per-item scores of each result (None where not every item was kept), aligned with results.json."""
    return atomic_write_json(path, {"items": [item_scores(r) for r in results]})


def with_items(results: list[EvalResult], path: Path) -> list[EvalResult]:
    """``results`` with the per-item scores of ``path`` put back as samples (``{"score": x}``)."""
    if not path.is_file():
        return results
    items = json.loads(path.read_text()).get("items", [])
    if len(items) != len(results):
        return results
    for result, scores in zip(results, items, strict=True):
        if isinstance(scores, list) and len(scores) == result.n:
            result.samples = [{"score": s} for s in scores]
    return results


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
    evidence: EvidenceSettings | None = None,
) -> dict[str, Any]:
    """Write the directory's report from ``before_results`` and each sub-run's files; the payload of
    results.json is returned (and the comparison table printed). ``evidence``: seeds, stopping rule
    and statistics settings (default: read from ``config``)."""
    from retainfirst.report import (
        RunSummary,
        compare_families,
        format_table,
        guarantee_rows,
        guarantee_table,
        headline_catalogue,
        headline_metrics,
        plot_cos_vs_recovery,
        plot_matched,
        plot_pareto,
        plot_training_curves,
        summarize_run,
        write_summary_md,
    )

    evidence = evidence or EvidenceSettings.from_config(config)
    tasks = get_tasks(config.eval.tasks)
    headlines = headline_catalogue(tasks)
    before_metrics = headline_metrics(before_results, tasks)
    before = RunSummary("before", "before", before_metrics, headlines=headlines)
    runs: list[RunSummary] = []
    merged: list[dict[str, Any]] = []
    per_run_results: dict[str, list[EvalResult]] = {}
    per_run_records: dict[str, list[dict[str, Any]]] = {}
    measurements: dict[str, Measurement] = {}
    for sub in plan:
        run_dir = out / "runs" / sub.name
        results = with_items(load_results(run_dir / "results.json"), run_dir / ITEMS_FILE)
        per_run_results[sub.name] = results
        measurements[sub.name] = measure(results, tasks)
        records = per_run_records[sub.name] = read_jsonl(run_dir / "metrics.jsonl")
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
    matched = matched_comparison(
        runs,
        measurements,
        per_run_records,
        before_metrics,
        headlines,
        evidence,
        weights={"alpha": config.train.alpha, "gamma": config.train.gamma},
    )
    if any(math.isfinite(x) and math.isfinite(y) for x, y in points):
        verdict = matched["verdict"]
    else:
        verdict = (
            f"No forget score was measured (evaluate {' or '.join(forget_task_names())} to compare fronts)."
        )
    level = matched["level"] if math.isfinite(matched["level"]) else None
    plots = {
        "Utility vs forget score per configuration, mean and CI over probes and seeds": plot_matched(
            matched["configurations"], out / "matched.png", level=level
        ).name,
        "Pareto front: forgetting vs utility": plot_pareto(runs, out / "pareto.png", before=before).name,
        "Per-step losses and cosines": plot_training_curves(merged, out / "training_curves.png").name,
        "Cosines over training (mean, minimum) vs utility recovery": plot_cos_vs_recovery(
            runs, out / "cos_vs_recovery.png", records=merged
        ).name,
    }
    guarantee = guarantee_rows([(p["label"], p["runs"]) for p in matched["configurations"]], per_run_records)
    payload = {
        "title": title,
        "model": config.model,
        "before": {"metrics": before_metrics, "results": [r.to_dict() for r in before_results]},
        "runs": [
            {**run.to_dict(), "results": [r.to_dict() for r in per_run_results[run.name]]} for run in runs
        ],
        "evaluation": evaluation_protocol(before_results, tasks, evidence, plan, matched),
        "matched": {k: v for k, v in matched.items() if k != "verdict"},
        "guarantee": guarantee,
        "comparison": {
            "fronts": {fam: [runs[i].name for i in idx] for fam, idx in comparison.fronts.items()},
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
        matched=matched["configurations"],
        protocol=describe_protocol(payload["evaluation"]),
        guarantee=guarantee_table(guarantee),
    )
    print_report(format_table(rows, title=title, headlines=headlines), verdict, out)
    return json_safe(payload)  # as written: NaN/inf become None


def evaluation_protocol(
    before_results: Sequence[EvalResult],
    tasks: Sequence[Any],
    evidence: EvidenceSettings,
    plan: Sequence[SubRun],
    matched: Mapping[str, Any],
) -> dict[str, Any]:
    """The evaluation choices behind the numbers (results.json ``evaluation``)."""
    from retainfirst.report import headline_catalogue

    items: dict[str, int] = {}
    for headline in headline_catalogue(tasks):
        counts = [r.n for r in before_results if _claimed_by(r, tasks) == headline.key]
        if counts:
            items[headline.key] = sum(counts) if headline.pool else counts[-1]
    seeds = sorted({s.train.seed for s in plan})
    return {
        "items_per_headline": items,
        "seeds": seeds,
        "runs_per_configuration": max((len(p["runs"]) for p in matched["configurations"]), default=0),
        "stopping_rule": matched["rule"],
        "matched_level": matched["level"],
        "matched": matched["matched"],
        "eval_every": evidence.every,
        "during_training_items": evidence.during_limit,
        "confidence_interval": (
            f"{100 * evidence.confidence:g} % percentile bootstrap, {evidence.resamples} resamples over "
            f"items and seeds (seed {evidence.bootstrap_seed})"
        ),
        "test": "paired bootstrap over items and seeds, two-sided; Holm-adjusted; Wilcoxon per headline",
        "significance": evidence.significance,
    }


def _claimed_by(result: EvalResult, tasks: Sequence[Any]) -> str | None:
    for task in tasks:
        headline = task.headline_for(result)
        if headline is not None:
            return str(headline.key)
    return None


def describe_protocol(protocol: Mapping[str, Any]) -> str:
    items = ", ".join(f"{k} {n}" for k, n in protocol["items_per_headline"].items()) or "none"
    return (
        f"Items per number: {items}. Seeds: {', '.join(map(str, protocol['seeds']))}. "
        f"Stopping rule: {protocol['stopping_rule']}. In-run evaluation every {protocol['eval_every']} "
        f"step(s) (0: none). Intervals: {protocol['confidence_interval']}. Test: {protocol['test']}."
    )


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


def _is_configured_sum(config: Configuration, weights: Mapping[str, float]) -> bool:
    """A ``sum`` configuration trained with the config's own loss weights (the naive sum)."""
    if config.family != BASELINE:
        return False
    others = set(config.settings) - set(weights)
    return not others and all(config.settings.get(k, v) == v for k, v in weights.items())


def matched_comparison(
    runs: Sequence[Any],
    measurements: Mapping[str, Measurement],
    records: Mapping[str, Sequence[Mapping[str, Any]]],
    before: Mapping[str, float],
    headlines: Sequence[Headline],
    evidence: EvidenceSettings,
    weights: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Every configuration's forget score and utility (mean, CI over probes and seeds) at the matched
    forget level, and each synthesizer's paired comparison with the configured ``sum`` and the best
    ``sum`` loss weighting, with the verdict sentences.

    ``runs``: RunSummary-like objects (``name``, ``family``, ``settings``, ``forget_score``);
    ``weights``: the config's ``alpha``/``gamma`` (which ``sum`` configuration is the naive one).
    """
    weights = dict(weights or {})
    stats = {
        "resamples": evidence.resamples,
        "confidence": evidence.confidence,
        "seed": evidence.bootstrap_seed,
    }
    stopped = evidence.forget_below is not None
    level = evidence.forget_below if stopped else common_level(r.forget_score for r in runs)
    by_name = {r.name: r for r in runs}
    outcomes = {r.name: outcome(r.name, records.get(r.name, []), r.forget_score, level) for r in runs}
    configs = group_configurations((r.name, r.family, r.settings) for r in runs)
    points: list[dict[str, Any]] = []
    for c in configs:
        est = estimate([measurements[n] for n in c.runs], before, headlines, **stats)
        points.append(
            {
                "label": c.label,
                "family": c.family,
                "curve": c.curve,
                "settings": c.settings,
                "runs": c.runs,
                "seeds": c.seeds,
                "reached": all(outcomes[n].reached for n in c.runs),
                "outcomes": [outcomes[n].to_dict() for n in c.runs],
                "forget": est["forget"].to_dict(),
                "utility": est["utility"].to_dict(),
            }
        )
    point_of = {p["label"]: p for p in points}
    reached = [c for c in configs if point_of[c.label]["reached"]]
    sums = [c for c in reached if c.family == BASELINE]
    baselines: dict[str, Configuration] = {}
    naive = next((c for c in sums if _is_configured_sum(c, weights)), None)
    if naive is not None:
        baselines["the configured sum"] = naive
    if sums:
        best = max(sums, key=lambda c: _finite_or(point_of[c.label]["utility"]["mean"], -math.inf))
        if best is not naive:
            baselines["the best sum loss weighting"] = best
    comparisons: list[Comparison] = []
    roles: list[str] = []
    for c in reached:
        if c.family == BASELINE:
            continue
        for role, base in baselines.items():
            comparisons.append(
                compare(
                    [measurements[n] for n in c.runs],
                    [measurements[n] for n in base.runs],
                    before,
                    headlines,
                    names=(c.label, base.label),
                    **stats,
                )
            )
            roles.append(role)
    comparisons = with_holm(comparisons)
    verdict = matched_verdict(points, comparisons, roles, level, stopped, evidence.significance)
    return {
        "level": level,
        "matched": stopped,
        "rule": (
            f"each run stopped at its first in-run evaluation with forget score <= {level:g}"
            if stopped
            else "no stopping rule: runs compared after their last step; level = highest final forget score"
        ),
        "configurations": points,
        "baselines": {role: c.label for role, c in baselines.items()},
        "comparisons": [
            {**c.to_dict(), "baseline": role} for c, role in zip(comparisons, roles, strict=True)
        ],
        "not_reached": [p["label"] for p in points if not p["reached"]],
        "verdict": verdict,
        "by_run": {name: outcomes[name].to_dict() for name in by_name},
    }


def _finite_or(value: Any, default: float) -> float:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else default


def matched_verdict(
    points: Sequence[Mapping[str, Any]],
    comparisons: Sequence[Comparison],
    roles: Sequence[str],
    level: float,
    stopped: bool,
    significance: float,
) -> str:
    """The verdict paragraph: the level, who did not reach it, one sentence per comparison."""
    if not math.isfinite(level):
        return "No forget score was measured, so no run can be compared at matched forgetting."
    lines: list[str] = []
    if stopped:
        lines.append(f"Compared at matched forgetting: every run stopped at forget score <= {level:.3g}.")
    else:
        finals = [
            p["forget"]["mean"] for p in points if math.isfinite(_finite_or(p["forget"]["mean"], math.nan))
        ]
        span = f" (final forget scores {min(finals):.3g} to {max(finals):.3g})" if finals else ""
        lines.append(
            f"Not compared at matched forgetting{span}: set stop.forget_below to stop every run at one "
            "forget level; the differences below mix forgetting and utility."
        )
    missing = [p["label"] for p in points if not p["reached"]]
    if missing:
        lines.append(f"Did not reach the level (left out of the comparison): {', '.join(missing)}.")
    if not comparisons:
        lines.append(
            f"No synthesizer could be compared with `{BASELINE}` "
            f"(that needs `{BASELINE}` runs that reached the level)."
        )
    for c, role in zip(comparisons, roles, strict=True):
        lines.append(f"- vs {role}: " + comparison_sentence(c, significance))
    if any(role == "the best sum loss weighting" for role in roles):
        lines.append("(The best sum weighting is chosen on these same evaluations, which favours `sum`.)")
    if comparisons:
        significant = [
            c for c in comparisons if c.p_value is not None and (c.p_adjusted or c.p_value) < significance
        ]
        lines.append(
            f"{len(significant)} of {len(comparisons)} differences are significant at {significance:g} "
            "(paired bootstrap over probes and seeds, Holm-adjusted over the comparisons)."
        )
    return "\n".join(lines)
