"""``tofu``: the TOFU benchmark's evaluation of one forget split (``eval.tofu_split``, default forget10).

Reads the TOFU folder (``eval.tofu_dir``, else ``data.dir``; layouts in :mod:`retainfirst.data.tofu`)
and reports, per set, TOFU's probability, ROUGE-L recall and truth ratio, then model utility and
forget quality (definitions in :mod:`retainfirst.evals.tofu`).

Headlines: the forget score is the forget set's ROUGE-L recall (lower = more forgotten; TOFU's
forget quality is a p-value where *higher* is better, so it cannot be a forget-score number),
the utility is TOFU's model utility, and forget quality is shown as a diagnostic. Forget quality
needs a saved evaluation of the retain model (``eval.tofu_retain_results``): the ``results.json`` of
``retainfirst eval --tasks tofu`` run on the model fine-tuned on the retain split only, or TOFU's
``eval_log_aggregated.json``; without one it is null, with a note in the result's settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retainfirst.errors import RetainFirstError
from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import register_task
from retainfirst.evals.tasks.base import EvalTask, Headline, TaskContext

FORGET = Headline(
    "tofu_forget",
    "forget",
    "rougeL_recall",
    higher_is_better=False,
    label="TOFU forget ROUGE",
    precedence=1,
    description="TOFU forget set: ROUGE-L recall of greedy answers (lower = more forgotten)",
)
UTILITY = Headline(
    "tofu_model_utility",
    "utility",
    "model_utility",
    higher_is_better=True,
    label="TOFU utility",
    description="TOFU model utility: harmonic mean of prob/ROUGE/truth ratio on retain, real, world",
)
QUALITY = Headline(
    "tofu_forget_quality",
    "diagnostic",
    "forget_quality",
    higher_is_better=True,
    label="TOFU forget quality",
    fmt="{:.3g}",
    description="TOFU forget quality: KS-test p-value of truth ratios vs the retain model (higher = closer)",
)
HEADLINES = {h.key: h for h in (FORGET, UTILITY, QUALITY)}


def shared_setting(config: Any, name: str) -> Any:
    """``eval.<name>``, else ``data.<name>`` (what the run trains on)."""
    return getattr(config.eval, name) or getattr(config.data, name)


def tofu_folder(config: Any) -> str | None:
    return config.eval.tofu_dir or config.data.dir


@register_task("tofu")
class TofuTask(EvalTask):
    role = "forget"
    headline = "rougeL_recall"
    higher_is_better = False
    label = "TOFU forget ROUGE"
    description = FORGET.description

    def headlines(self) -> list[Headline]:
        return [FORGET, UTILITY, QUALITY]

    def headline_for(self, result: EvalResult) -> Headline | None:
        return HEADLINES.get(result.task)

    def check_config(self, config: Any) -> None:
        if not tofu_folder(config):
            raise RetainFirstError("config: eval task tofu needs data.dir or eval.tofu_dir (the TOFU folder)")

    def prepare(self, context: TaskContext) -> dict[str, Any]:
        from retainfirst.data.tofu import load_tofu
        from retainfirst.evals.tofu import retain_reference_values

        config = context.config
        self.check_config(config)
        split = shared_setting(config, "tofu_split")
        data = load_tofu(tofu_folder(config), split, config.eval.tofu_limit)
        path = config.eval.tofu_retain_results
        reference = None
        note = (
            "no eval.tofu_retain_results: forget quality needs a saved evaluation of the retain model "
            "(retainfirst eval --tasks tofu on it)"
        )
        if path:
            file = Path(path)
            if not file.is_file():
                raise RetainFirstError(f"eval.tofu_retain_results: {path} does not exist")
            try:
                payload = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise RetainFirstError(
                    f"eval.tofu_retain_results: {path} is not valid JSON ({exc.msg})"
                ) from None
            try:
                reference = retain_reference_values(payload)
            except RetainFirstError as exc:
                raise RetainFirstError(f"eval.tofu_retain_results: {path}: {exc}") from None
            note = f"KS test against {path} ({len(reference)} questions)"
        return {
            "data": data,
            "template": shared_setting(config, "tofu_template"),
            "reference": reference,
            "note": note,
        }

    def describe(self, data: dict[str, Any]) -> str:
        return ", ".join(f"{name} {n}" for name, n in data["data"].counts().items()) + " questions"

    def run(self, model: Any, tokenizer: Any, data: dict[str, Any], settings: Any) -> list[EvalResult]:
        from retainfirst.evals.tofu import evaluate_tofu

        return evaluate_tofu(
            model,
            tokenizer,
            data["data"],
            template=data["template"],
            batch_size=settings.batch_size,
            max_new_tokens=settings.tofu_max_new_tokens,
            reference=data["reference"],
            reference_note=data["note"],
        )
