"""Headline scores of a run: what was forgotten, what was kept, and how much of it was recovered.

Evaluation results (:class:`~retainfirst.evals.results.EvalResult`) are reduced to a handful of
numbers that are comparable across runs. Which numbers, and what they mean, is declared by the
evaluation tasks (:mod:`retainfirst.evals.tasks`): each result is claimed by a task, which names the
:class:`~retainfirst.evals.tasks.Headline` it feeds (e.g. the facts probes pool into ``forget`` and
``neighbor``, MMLU gives ``mmlu``, perplexity ``ppl``), its role and its direction.

- the *forget score* is the mean of the ``forget``-role numbers of the highest precedence present
  (probe recall, else WMDP accuracy); lower = more forgotten;
- *recovery* is after/before of each ``utility``-role number in % (before/after when lower is
  better), and the *utility* of a run is the mean of its recoveries, so runs on different scales
  share one axis. ``diagnostic`` numbers are only shown.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import EvalTask, Headline, task_classes
from retainfirst.evals.tasks.base import ROLES, pooled


def default_tasks() -> list[EvalTask]:
    """Every registered task that needs no parameter (what the report knows without a config)."""
    return [cls() for cls in task_classes() if not cls.parametrised]


def headline_catalogue(tasks: Sequence[EvalTask] | None = None) -> list[Headline]:
    """The headlines of ``tasks`` (default: all registered), ordered by role then registration order."""
    tasks = default_tasks() if tasks is None else list(tasks)
    order = {cls: i for i, cls in enumerate(task_classes())}
    ranked = sorted(
        (
            (ROLES.index(h.role), order.get(type(t), len(order)), k, h)
            for k, t in enumerate(tasks)
            for h in t.headlines()
        ),
        key=lambda item: item[:3],
    )
    seen: dict[str, Headline] = {}
    for *_, headline in ranked:
        seen.setdefault(headline.key, headline)
    return list(seen.values())


def _claim(result: EvalResult, tasks: Sequence[EvalTask]) -> Headline | None:
    for task in tasks:
        headline = task.headline_for(result)
        if headline is not None:
            return headline
    return None


def headline_metrics(
    results: Iterable[EvalResult], tasks: Sequence[EvalTask] | None = None
) -> dict[str, float]:
    """Reduce evaluation results to their headline numbers (``tasks``: default all registered)."""
    tasks = default_tasks() if tasks is None else list(tasks)
    groups: dict[str, tuple[Headline, list[EvalResult]]] = {}
    for result in results:
        headline = _claim(result, tasks)
        if headline is not None:
            groups.setdefault(headline.key, (headline, []))[1].append(result)
    out: dict[str, float] = {}
    for key, (headline, claimed) in groups.items():
        if headline.pool:
            value = pooled([(headline.value_of(r), r.n) for r in claimed])
        else:
            values = [v for v in (headline.value_of(r) for r in claimed) if v is not None]
            value = values[-1] if values else None
        if value is not None:
            out[key] = value
    return out


def forget_score(metrics: Mapping[str, float], headlines: Sequence[Headline] | None = None) -> float:
    """The one forgetting number of a run (lower is better); NaN when nothing forget-related was measured."""
    forget = [h for h in (headline_catalogue() if headlines is None else headlines) if h.role == "forget"]
    present = [h for h in forget if h.key in metrics]
    if not present:
        return math.nan
    top = max(h.precedence for h in present)
    values = [metrics[h.key] for h in present if h.precedence == top]
    return sum(values) / len(values)


def recovery(
    before: Mapping[str, float], after: Mapping[str, float], headlines: Sequence[Headline] | None = None
) -> dict[str, float]:
    """Recovery in % of each utility number present in both (after/before; before/after when lower is
    better)."""
    out: dict[str, float] = {}
    for h in headline_catalogue() if headlines is None else headlines:
        if h.role != "utility":
            continue
        b, a = before.get(h.key), after.get(h.key)
        if b is None or a is None or not (math.isfinite(a) and math.isfinite(b)):
            continue
        num, den = (a, b) if h.higher_is_better else (b, a)
        out[h.key] = 100.0 * num / den if den != 0 else math.nan
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
    headlines: Sequence[Headline] | None = field(default=None, repr=False, compare=False)

    @property
    def forget_score(self) -> float:
        return forget_score(self.metrics, self.headlines)

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
    tasks: Sequence[EvalTask] | None = None,
) -> RunSummary:
    """Scores of one trained run against the ``before`` headline metrics (``tasks``: the run's tasks)."""
    metrics = headline_metrics(results, tasks)
    headlines = headline_catalogue(tasks)
    return RunSummary(
        name=name,
        family=family,
        metrics=metrics,
        recovery=recovery(before, metrics, headlines),
        final_stats=dict(final_stats or {}),
        settings=dict(settings or {}),
        headlines=headlines,
    )
