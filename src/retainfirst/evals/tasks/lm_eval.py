"""``lm_eval:<task>``: any lm-evaluation-harness task through the bridge (optional extra), a diagnostic.

Parametrised: ``lm_eval:arc_easy`` runs the harness task ``arc_easy``; its ``acc`` is shown as
``lm_eval:arc_easy``. The harness's own sub-task results are recorded too.
"""

from __future__ import annotations

from typing import Any

from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import register_task
from retainfirst.evals.tasks.base import EvalTask, Headline, TaskContext


@register_task("lm_eval")
class LmEvalTask(EvalTask):
    role = "diagnostic"
    headline = "acc"
    higher_is_better = True
    parametrised = True
    description = "accuracy on an lm-evaluation-harness task"

    def headline_for(self, result: EvalResult) -> Headline | None:
        return self.headlines()[0] if result.task == self.param else None

    def prepare(self, context: TaskContext) -> tuple[int | None, bool]:
        ev = context.config.eval
        return ev.lm_eval_limit, ev.lm_eval_allow_code

    def describe(self, data: tuple[int | None, bool]) -> str:
        limit = data[0]
        return f"harness task {self.param}" + (f" (limit {limit})" if limit else "")

    def run(
        self, model: Any, tokenizer: Any, data: tuple[int | None, bool], settings: Any
    ) -> list[EvalResult]:
        from retainfirst.evals.lm_eval_bridge import run_lm_eval

        limit, allow_code = data
        return run_lm_eval(model, tokenizer, [self.param], limit=limit, allow_code=allow_code)
