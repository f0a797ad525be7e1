"""``mia``: membership inference (LOSS, zlib, Min-K%, Min-K++%) of forget vs retain texts, a diagnostic.

Texts: RWKU's MIA sets when the run uses RWKU, else the training forget/retain texts. The headline is
the LOSS attack's AUC (0.5: the forget texts look as familiar as the retain texts; lower: forgotten).
"""

from __future__ import annotations

from typing import Any

from retainfirst.errors import RetainFirstError
from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import register_task
from retainfirst.evals.tasks.base import EvalTask, TaskContext


@register_task("mia")
class MiaTask(EvalTask):
    role = "diagnostic"
    headline = "auc_loss"
    higher_is_better = False
    label = "MIA AUC"
    description = "membership-inference AUC (LOSS) of forget vs retain texts (0.5 = indistinguishable)"

    def prepare(self, context: TaskContext) -> dict[str, Any]:
        if context.uses("rwku"):
            rwku = context.source("rwku")
            forget, retain = rwku.texts("mia_forget"), rwku.texts("mia_retain")
        elif context.forget_texts:
            forget, retain = context.forget_texts, context.retain_texts
        else:
            raise RetainFirstError("the mia task needs training data (a run) or RWKU's MIA sets (rwku)")
        return {"forget": forget, "retain": retain, "max_length": context.config.data.max_length}

    def describe(self, data: dict[str, Any]) -> str:
        return f"{len(data['forget'])} forget and {len(data['retain'])} retain texts"

    def run(self, model: Any, tokenizer: Any, data: dict[str, Any], settings: Any) -> list[EvalResult]:
        from retainfirst.evals.mia import evaluate_mia

        return [evaluate_mia(model, tokenizer, data["forget"], data["retain"], max_length=data["max_length"])]
