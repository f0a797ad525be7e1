"""The base of the attack tasks (not a task itself): score an attacked copy of the model with the
run's other tasks.

An attack task (relearning, quantization) wraps the *inner* tasks of ``eval.tasks`` (those with a
headline of the roles it re-measures), prepares their data itself (shared sources such as the facts
benchmark are built once per directory by the :class:`~retainfirst.evals.tasks.TaskContext`, so
this costs a second ``prepare`` call, not a second build), runs them on the model as it is and on
the attacked copy, and reports the attacked results under a prefix plus summary numbers. Its
headlines are diagnostics: they never enter the forget score or the utility of the main table.

Recovered fraction of an attack: ``(after - unlearned) / (before - unlearned)`` on the forget score
(the mean of the inner forget headlines of the highest precedence, as in the report): 0 = the attack
brought nothing back, 1 = back to the model before unlearning. It needs the score before
unlearning, which a training run measures on the original model when the task is prepared.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from retainfirst.errors import RetainFirstError
from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import get_task
from retainfirst.evals.tasks.base import EvalTask, Headline, Role, TaskContext, pooled

MIN_FORGOTTEN = 1e-9  # below this drop in forget score the recovered fraction is undefined


HeadlineValues = dict[str, tuple[Headline, float]]


def headline_values(results: Iterable[EvalResult], tasks: Sequence[EvalTask]) -> HeadlineValues:
    """The headline numbers ``tasks`` claim in ``results`` (pooled where a headline pools), as the
    report computes them."""
    groups: dict[str, tuple[Headline, list[EvalResult]]] = {}
    for result in results:
        for task in tasks:
            headline = task.headline_for(result)
            if headline is not None:
                groups.setdefault(headline.key, (headline, []))[1].append(result)
                break
    out: HeadlineValues = {}
    for key, (headline, claimed) in groups.items():
        if headline.pool:
            value = pooled([(headline.value_of(r), r.n) for r in claimed])
        else:
            values = [v for v in (headline.value_of(r) for r in claimed) if v is not None]
            value = values[-1] if values else None
        if value is not None and math.isfinite(value):
            out[key] = (headline, value)
    return out


def forget_score(values: HeadlineValues) -> float | None:
    """Mean of the forget headlines of the highest precedence present (None: none measured)."""
    forget = [(h, v) for h, v in values.values() if h.role == "forget"]
    if not forget:
        return None
    top = max(h.precedence for h, _ in forget)
    chosen = [v for h, v in forget if h.precedence == top]
    return sum(chosen) / len(chosen)


def recovered_fraction(before: float | None, unlearned: float | None, after: float | None) -> float | None:
    """``(after - unlearned) / (before - unlearned)``; None when a score is missing or unlearning
    lowered the forget score by less than ``MIN_FORGOTTEN`` (nothing to recover)."""
    if before is None or unlearned is None or after is None:
        return None
    gap = before - unlearned
    return (after - unlearned) / gap if gap > MIN_FORGOTTEN else None


def utility_kept(unlearned: HeadlineValues, after: HeadlineValues) -> dict[str, float]:
    """Each utility headline after the attack in % of the unlearned model's (inverted when lower is
    better, like the report's recovery)."""
    out: dict[str, float] = {}
    for key, (headline, value) in after.items():
        if headline.role != "utility" or key not in unlearned:
            continue
        base = unlearned[key][1]
        num, den = (value, base) if headline.higher_is_better else (base, value)
        out[key] = 100.0 * num / den if den != 0 else math.nan
    return out


def evaluate_tasks(
    model: Any, tokenizer: Any, tasks: Sequence[EvalTask], data: dict[str, Any], settings: Any
) -> list[EvalResult]:
    """Run ``tasks`` on ``model`` in eval mode (restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        return [r for task in tasks for r in task.run(model, tokenizer, data[task.id], settings)]
    finally:
        model.train(was_training)


@dataclass
class AttackData:
    """What an attack task's ``prepare`` returns: the inner tasks and their data, the attack's
    options, the original model (weakly: to recognise the "before" evaluation) and its scores."""

    tasks: list[EvalTask]
    data: dict[str, Any]
    options: dict[str, Any]
    original: weakref.ReferenceType[Any] | None = None
    reference: HeadlineValues | None = None  # headline values of the model before unlearning
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def reference_score(self) -> float | None:
        return None if self.reference is None else forget_score(self.reference)

    def is_original(self, model: Any) -> bool:
        return self.original is not None and self.original() is model


class AttackTask(EvalTask):
    """Base of attack tasks: pick and prepare the inner tasks, measure the reference, summarise."""

    role = "diagnostic"
    higher_is_better = False
    target_roles: ClassVar[tuple[Role, ...]] = ("forget",)
    tasks_option: ClassVar[str]  # eval option naming the inner tasks (default: all fitting ones)

    # -- inner tasks ----------------------------------------------------------------------------
    def inner_tasks(self, config: Any) -> list[EvalTask]:
        """The tasks to re-run: ``eval.<tasks_option>`` or every task of ``eval.tasks`` with a
        headline of ``target_roles`` (never another attack)."""
        named = getattr(config.eval, self.tasks_option)
        tasks: list[EvalTask] = []
        for name in config.eval.tasks if named is None else named:
            task = get_task(name)
            fits = not isinstance(task, AttackTask) and any(
                h.role in self.target_roles for h in task.headlines()
            )
            if fits and task.id not in {t.id for t in tasks}:
                tasks.append(task)
            elif named is not None and not fits:
                raise RetainFirstError(
                    f"config: eval.{self.tasks_option} lists {name!r}, which has no "
                    f"{'/'.join(self.target_roles)} number to re-measure"
                )
        if not tasks:
            raise RetainFirstError(
                f"config: eval task {self.name} re-runs the {'/'.join(self.target_roles)} tasks, but "
                "eval.tasks has none; add one (e.g. facts)"
            )
        return tasks

    def check_config(self, config: Any) -> None:
        for task in self.inner_tasks(config):
            task.check_config(config)
        self.options(config.eval)

    def sources(self, config: Any) -> set[str]:
        return {name for task in self.inner_tasks(config) for name in task.sources(config)}

    def options(self, settings: Any) -> dict[str, Any]:
        """This attack's validated options (recorded in every result's settings)."""
        raise NotImplementedError

    def prepare_inner(self, context: TaskContext) -> AttackData:
        tasks = self.inner_tasks(context.config)
        return AttackData(
            tasks=tasks,
            data={task.id: task.prepare(context) for task in tasks},
            options=self.options(context.config.eval),
            # In a training run the prepared model is the one before unlearning; the runner then
            # evaluates that very object ("before"), where there is nothing to attack.
            original=weakref.ref(context.model) if context.training else None,
        )

    def measure_reference(self, context: TaskContext, data: AttackData) -> None:
        """Score the inner forget tasks on the model before unlearning (training runs only)."""
        if not context.training:
            return
        forget = [t for t in data.tasks if any(h.role == "forget" for h in t.headlines())]
        if forget:
            results = evaluate_tasks(context.model, context.tokenizer, forget, data.data, context.config.eval)
            data.reference = headline_values(results, forget)

    # -- results --------------------------------------------------------------------------------
    def attack_results(
        self,
        prefix: str,
        data: AttackData,
        unlearned: list[EvalResult],
        attacked: list[EvalResult],
        settings: dict[str, Any],
        *,
        with_utility: bool = False,
    ) -> list[EvalResult]:
        """``<prefix>/<task>`` for each attacked result, then ``<prefix>_forget`` (forget score after
        the attack, unlearned, before), ``<prefix>`` (recovered fraction) and, with utility,
        ``<prefix>_utility`` (utility kept, % of the unlearned model's)."""
        out = [
            EvalResult(
                f"{prefix}/{r.task}", dict(r.metrics), r.n, {**r.settings, "attack": settings}, r.breakdown
            )
            for r in attacked
        ]
        before_values = data.reference or {}
        unlearned_values = headline_values(unlearned, data.tasks)
        after_values = headline_values(attacked, data.tasks)
        before, now, after = data.reference_score, forget_score(unlearned_values), forget_score(after_values)
        n_forget = sum(
            r.n for r in attacked if any((h := t.headline_for(r)) and h.role == "forget" for t in data.tasks)
        )
        if after is not None:
            scores = {"after": after, "unlearned": now} | ({"before": before} if before is not None else {})
            breakdown = {
                stage: {k: v for k, (_, v) in values.items()}
                for stage, values in (
                    ("after", after_values),
                    ("unlearned", unlearned_values),
                    ("before", before_values),
                )
                if values
            }
            out.append(EvalResult(f"{prefix}_forget", scores, n_forget, settings, breakdown))
            fraction = recovered_fraction(before, now, after)
            out.append(
                EvalResult(prefix, {} if fraction is None else {"recovered": fraction}, n_forget, settings)
            )
        if with_utility:
            kept = utility_kept(unlearned_values, after_values)
            finite = [v for v in kept.values() if math.isfinite(v)]
            if finite:
                metrics = {"utility": sum(finite) / len(finite)} | {f"kept/{k}": v for k, v in kept.items()}
                n_utility = sum(r.n for r in attacked) - n_forget
                out.append(EvalResult(f"{prefix}_utility", metrics, n_utility, settings))
        return out


def attack_headlines(prefix: str, label: str, *, with_utility: bool = False) -> list[Headline]:
    """The diagnostic headlines of one attack: recovered fraction, forget score after it, utility kept."""
    headlines = [
        Headline(
            prefix,
            "diagnostic",
            "recovered",
            higher_is_better=False,
            label=f"{label} rec.",
            description=f"share of the forgotten score that {label} brings back "
            "((after - unlearned) / (before - unlearned); 0 = none, 1 = all)",
        ),
        Headline(
            f"{prefix}_forget",
            "diagnostic",
            "after",
            higher_is_better=False,
            label=f"forget after {label}",
            description=f"forget score after {label} (lower = still forgotten)",
        ),
    ]
    if with_utility:
        headlines.append(
            Headline(
                f"{prefix}_utility",
                "diagnostic",
                "utility",
                higher_is_better=True,
                label=f"utility after {label} %",
                fmt="{:.1f}",
                description=f"utility numbers after {label}, mean % of the unlearned model's",
            )
        )
    return headlines
