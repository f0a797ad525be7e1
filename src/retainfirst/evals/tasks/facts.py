"""``facts``: the bundled benchmark's probes (fill-in-the-blank, QA, adversarial) scored by ROUGE-L recall.

Results and the numbers they pool into:

- ``forget_*`` -> ``forget`` (forget score);
- ``heldout_fb``/``heldout_qa`` -> ``heldout``, the primary utility: facts of the forget set's
  relation families that no training corpus contains, so a method cannot keep them by memorising
  the retain set;
- ``general_qa`` -> ``general_qa``, a second utility: general knowledge outside those families
  (collateral damage);
- ``retain_fit_*`` -> ``retain_fit``, a diagnostic only: the retain corpus' own facts, which the
  retain loss trains on, so a high number shows fit to the retain set, not kept knowledge.

``neighbor_*`` results (facts-1 run directories, and RWKU through :mod:`.rwku`) still feed
``neighbor``. Probes are generated with the settings the benchmark's knowledge filter used, so a
kept fact's "before" score is the score the filter saw.
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
HELDOUT = Headline(
    "heldout",
    "utility",
    "rougeL_recall",
    higher_is_better=True,
    label="held-out",
    pool=True,
    description="mean ROUGE-L recall over held-out fact probes (same families, in no training corpus)",
)
GENERAL_QA = Headline(
    "general_qa",
    "utility",
    "rougeL_recall",
    higher_is_better=True,
    label="general QA",
    pool=True,
    description="mean ROUGE-L recall over general-knowledge questions no corpus touches (collateral)",
)
RETAIN_FIT = Headline(
    "retain_fit",
    "diagnostic",
    "rougeL_recall",
    higher_is_better=True,
    label="retain fit",
    pool=True,
    description="mean ROUGE-L recall over the retain corpus' own facts (trained on: fit, not utility)",
)
# result-name prefix -> headline, for the facts task's own probe sets
FACTS_HEADLINES = {
    "forget_": FORGET,
    "heldout_": HELDOUT,
    "general_qa": GENERAL_QA,
    "retain_fit_": RETAIN_FIT,
    "neighbor_": NEIGHBOR,
}


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
        return [FORGET, HELDOUT, GENERAL_QA, NEIGHBOR, RETAIN_FIT]

    def headline_for(self, result: EvalResult) -> Headline | None:
        return next((h for prefix, h in FACTS_HEADLINES.items() if result.task.startswith(prefix)), None)

    def sources(self, config: Any) -> set[str]:
        return {"facts"}

    def prepare(self, context: TaskContext) -> dict[str, Any]:
        bench = context.source("facts")
        limit = context.config.eval.probe_limit
        return {  # a set the model knew nothing of (e.g. no general question) is left out
            "probes": {name: limited(p, limit) for name, p in bench.probes.items() if p},
            "settings": dict(getattr(bench, "eval_settings", {})),
        }

    def describe(self, data: dict[str, Any]) -> str:
        return describe_probes(data)

    def run(self, model: Any, tokenizer: Any, data: dict[str, Any], settings: Any) -> list[EvalResult]:
        return run_probes(model, tokenizer, data, settings)
