"""``facts``: the bundled benchmark's probes (fill-in-the-blank, QA, adversarial) scored by ROUGE-L recall.

The results ``forget_*`` pool into the ``forget`` number, ``neighbor_*`` into ``neighbor`` (a retained
utility). Probes are generated with the settings the benchmark's knowledge filter used, so a kept
fact's "before" score is the score the filter saw.
"""

from __future__ import annotations

from typing import Any

from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import register_task
from retainfirst.evals.tasks.base import EvalTask, Headline, TaskContext, limited

FORGET = Headline(
    "forget",
    "forget",
    "rougeL_recall",
    higher_is_better=False,
    pool=True,
    precedence=1,
    description="mean ROUGE-L recall of greedy answers over all forget probes (lower = more forgotten)",
)
NEIGHBOR = Headline(
    "neighbor",
    "utility",
    "rougeL_recall",
    higher_is_better=True,
    pool=True,
    description="the same over neighbor probes (facts that must be kept)",
)


def probe_headline(task: str, prefix: str = "") -> Headline | None:
    """``forget``/``neighbor`` for the probe families ``{prefix}forget_*`` / ``{prefix}neighbor_*``."""
    if task.startswith(f"{prefix}forget"):
        return FORGET
    if task.startswith(f"{prefix}neighbor"):
        return NEIGHBOR
    return None


def run_probes(model: Any, tokenizer: Any, data: dict[str, Any], settings: Any) -> list[EvalResult]:
    """Greedy generation on each probe family (``data``: ``probes`` by family and generation ``settings``)."""
    from retainfirst.evals.generation import evaluate_generation

    return [
        evaluate_generation(
            model,
            tokenizer,
            probes,
            task=family,
            batch_size=settings.batch_size,
            progress=True,
            **{"max_new_tokens": settings.max_new_tokens, **data["settings"]},
        )
        for family, probes in data["probes"].items()
    ]


def describe_probes(data: dict[str, Any]) -> str:
    return ", ".join(f"{family} {len(p)}" for family, p in data["probes"].items()) + " probes"


@register_task("facts")
class FactsTask(EvalTask):
    role = "forget"
    headline = "rougeL_recall"
    higher_is_better = False

    def headlines(self) -> list[Headline]:
        return [FORGET, NEIGHBOR]

    def headline_for(self, result: EvalResult) -> Headline | None:
        return probe_headline(result.task)

    def sources(self, config: Any) -> set[str]:
        return {"facts"}

    def prepare(self, context: TaskContext) -> dict[str, Any]:
        bench = context.source("facts")
        limit = context.config.eval.probe_limit
        return {
            "probes": {name: limited(p, limit) for name, p in bench.probes.items()},
            "settings": dict(getattr(bench, "eval_settings", {})),
        }

    def describe(self, data: dict[str, Any]) -> str:
        return describe_probes(data)

    def run(self, model: Any, tokenizer: Any, data: dict[str, Any], settings: Any) -> list[EvalResult]:
        return run_probes(model, tokenizer, data, settings)
