"""``rwku``: RWKU's forget and neighbor probes of the forget targets (``data.dir``), as ``rwku_*`` results.

They feed the same ``forget`` / ``neighbor`` numbers as the facts benchmark's probes.
"""

from __future__ import annotations

from typing import Any

from retainfirst.errors import RetainFirstError
from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import register_task
from retainfirst.evals.tasks.base import EvalTask, Headline, TaskContext, limited
from retainfirst.evals.tasks.facts import FORGET, NEIGHBOR, describe_probes, probe_headline, run_probes

PREFIX = "rwku_"


@register_task("rwku")
class RwkuTask(EvalTask):
    role = "forget"
    headline = "rougeL_recall"
    higher_is_better = False

    def headlines(self) -> list[Headline]:
        return [FORGET, NEIGHBOR]

    def headline_for(self, result: EvalResult) -> Headline | None:
        return probe_headline(result.task, PREFIX)

    def check_config(self, config: Any) -> None:
        if not config.data.dir:
            raise RetainFirstError("config: eval task rwku needs data.dir (the RWKU folder)")

    def sources(self, config: Any) -> set[str]:
        return {"rwku"}

    def prepare(self, context: TaskContext) -> dict[str, Any]:
        rwku = context.source("rwku")
        limit = context.config.eval.probe_limit
        return {
            "probes": {f"{PREFIX}{name}": limited(p, limit) for name, p in rwku.probes.items()},
            "settings": {},
        }

    def describe(self, data: dict[str, Any]) -> str:
        return describe_probes(data)

    def run(self, model: Any, tokenizer: Any, data: dict[str, Any], settings: Any) -> list[EvalResult]:
        return run_probes(model, tokenizer, data, settings)
