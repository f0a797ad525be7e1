"""``perplexity``: perplexity on held-out general text, a retained utility (lower is better).

The texts are ``eval.ppl_texts`` (a file under ``data.dir``, a path or a hub id), else the facts
benchmark's held-out general texts. The headline number is called ``ppl``.
"""

from __future__ import annotations

from typing import Any

from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import register_task
from retainfirst.evals.tasks.base import EvalTask, Headline, TaskContext


@register_task("perplexity")
class PerplexityTask(EvalTask):
    role = "utility"
    headline = "perplexity"
    higher_is_better = False

    def headlines(self) -> list[Headline]:
        return [
            Headline(
                "ppl",
                "utility",
                "perplexity",
                higher_is_better=False,
                fmt="{:.2f}",
                description="perplexity on held-out general text",
            )
        ]

    def sources(self, config: Any) -> set[str]:
        return set() if config.eval.ppl_texts else {"facts"}

    def prepare(self, context: TaskContext) -> list[str]:
        texts = context.config.eval.ppl_texts
        return context.load_texts(texts) if texts else list(context.source("facts").general_texts)

    def describe(self, data: list[str]) -> str:
        return f"{len(data)} texts"

    def run(self, model: Any, tokenizer: Any, data: list[str], settings: Any) -> list[EvalResult]:
        from retainfirst.evals.perplexity import evaluate_perplexity

        return [
            evaluate_perplexity(model, tokenizer, data, max_length=settings.ppl_max_length, progress=True)
        ]
