"""Headline scores of a run: what was forgotten, what was kept, and how much of it was recovered.

Evaluation results (:class:`~retainfirst.evals.results.EvalResult`) are reduced to a handful of
numbers that are comparable across runs:

- ``forget``: mean ROUGE-L recall over all forget probes (pooled over levels; lower = more forgotten);
- ``neighbor``: the same over neighbor probes (higher = better kept);
- ``mmlu`` / ``wmdp_bio`` / ``wmdp_cyber``: multiple-choice accuracy;
- ``ppl``: perplexity on held-out general text (lower = better).

Recovery is after/before of each retained metric in % (before/after for perplexity), and the
*utility* of a run is the mean of its recoveries, so runs on different scales share one axis.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from retainfirst.evals.results import EvalResult

# Metric keys that hold the headline number of each kind of task, most specific first.
GENERATION_KEYS = ("rougeL_recall", "rouge_l_recall", "rougeL", "rouge_l", "rouge")
ACCURACY_KEYS = ("acc", "accuracy", "acc_norm")
PERPLEXITY_KEYS = ("perplexity", "ppl")

FORGET_PREFIXES = ("forget_", "rwku_forget")
NEIGHBOR_PREFIXES = ("neighbor_", "rwku_neighbor")
MCQ_TASKS = ("mmlu", "wmdp_bio", "wmdp_cyber")

# Retained metrics and whether higher is better (recovery = after/before, or before/after).
RETAINED: dict[str, bool] = {"neighbor": True, "mmlu": True, "ppl": False}


def _first_metric(metrics: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _pooled(results: Iterable[EvalResult], keys: Sequence[str]) -> float | None:
    """Mean over all items of several tasks (each task's mean weighted by its number of items)."""
    total, count = 0.0, 0
    for result in results:
        value = _first_metric(result.metrics, keys)
        if value is None or not math.isfinite(value) or result.n <= 0:
            continue
        total += value * result.n
        count += result.n
    return total / count if count else None


def headline_metrics(results: Iterable[EvalResult]) -> dict[str, float]:
    """Reduce a list of evaluation results to the headline metrics described in the module doc."""
    results = list(results)
    out: dict[str, float] = {}
    forget = _pooled((r for r in results if r.task.startswith(FORGET_PREFIXES)), GENERATION_KEYS)
    neighbor = _pooled((r for r in results if r.task.startswith(NEIGHBOR_PREFIXES)), GENERATION_KEYS)
    if forget is not None:
        out["forget"] = forget
    if neighbor is not None:
        out["neighbor"] = neighbor
    for result in results:
        if result.task in MCQ_TASKS:
            value = _first_metric(result.metrics, ACCURACY_KEYS)
            if value is not None:
                out[result.task] = value
        elif result.task == "perplexity":
            value = _first_metric(result.metrics, PERPLEXITY_KEYS)
            if value is not None:
                out["ppl"] = value
    return out


def forget_score(metrics: Mapping[str, float]) -> float:
    """The one forgetting number of a run (lower is better): probe recall, else mean WMDP accuracy."""
    if "forget" in metrics:
        return metrics["forget"]
    wmdp = [metrics[k] for k in ("wmdp_bio", "wmdp_cyber") if k in metrics]
    return sum(wmdp) / len(wmdp) if wmdp else math.nan


def recovery(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """Recovery in % of each retained metric present in both (after/before; before/after for ppl)."""
    out: dict[str, float] = {}
    for name, higher_is_better in RETAINED.items():
        b, a = before.get(name), after.get(name)
        if b is None or a is None or not (math.isfinite(a) and math.isfinite(b)):
            continue
        num, den = (a, b) if higher_is_better else (b, a)
        out[name] = 100.0 * num / den if den != 0 else math.nan
    return out


def utility(rec: Mapping[str, float]) -> float:
    """Mean recovery % over the retained metrics (the utility axis of the Pareto plots)."""
    values = [v for v in rec.values() if math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


@dataclass
class RunSummary:
    """One row of the comparison: a trained run (or the ``before`` baseline) and its scores."""

    name: str
    family: str
    metrics: dict[str, float]
    recovery: dict[str, float] = field(default_factory=dict)
    final_stats: dict[str, float] = field(default_factory=dict)  # last training step's synthesis stats
    settings: dict[str, Any] = field(default_factory=dict)  # what distinguishes this run (grid values)

    @property
    def forget_score(self) -> float:
        return forget_score(self.metrics)

    @property
    def utility(self) -> float:
        return utility(self.recovery)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "metrics": self.metrics,
            "recovery": self.recovery,
            "forget_score": self.forget_score,
            "utility": self.utility,
            "final_stats": self.final_stats,
            "settings": self.settings,
        }


def summarize_run(
    name: str,
    family: str,
    before: Mapping[str, float],
    results: Iterable[EvalResult],
    final_stats: Mapping[str, float] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> RunSummary:
    """Scores of one trained run against the ``before`` headline metrics."""
    metrics = headline_metrics(results)
    return RunSummary(
        name=name,
        family=family,
        metrics=metrics,
        recovery=recovery(before, metrics),
        final_stats=dict(final_stats or {}),
        settings=dict(settings or {}),
    )
