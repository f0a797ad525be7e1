"""Shared by ``wmdp_bio`` and ``wmdp_cyber``: WMDP multiple-choice accuracy (lower = more forgotten)."""

from __future__ import annotations

from typing import Any, ClassVar

from retainfirst.errors import RetainFirstError
from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks.base import EvalTask, TaskContext, limited
from retainfirst.evals.tasks.mmlu import run_mcq


class WmdpTask(EvalTask):
    """Questions of one WMDP domain from ``data.dir`` (not registered itself)."""

    domain: ClassVar[str]
    role = "forget"
    headline = "acc"
    higher_is_better = False

    def check_config(self, config: Any) -> None:
        if not config.data.dir:
            raise RetainFirstError(f"config: eval task {self.name} needs data.dir (the WMDP data folder)")

    def prepare(self, context: TaskContext) -> list[Any]:
        from retainfirst.data import load_wmdp_mcq

        config = context.config
        return limited(load_wmdp_mcq(config.data.dir, self.domain), config.eval.wmdp_limit)

    def describe(self, data: list[Any]) -> str:
        return f"{len(data)} questions"

    def run(self, model: Any, tokenizer: Any, data: list[Any], settings: Any) -> list[EvalResult]:
        return run_mcq(model, tokenizer, self.id, data, settings, settings.wmdp_shots)
