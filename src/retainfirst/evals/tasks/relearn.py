"""``relearn``: the relearning attack (:mod:`retainfirst.evals.attacks.relearn`) as a diagnostic.

A deep copy of the model is fine-tuned for ``eval.relearn_steps`` on forget-related text, then the
run's forget tasks are scored again. Results: ``relearn/<result>`` (each attacked forget result),
``relearn_forget`` (forget score after the attack, of the unlearned model and before unlearning, on
the same evaluated probes) and ``relearn`` (recovered fraction). Nothing runs on the model before
unlearning (the "before" row stays empty); its score is measured once when the task is prepared.

Options (``eval`` section): ``relearn_steps`` (10), ``relearn_lr`` (5e-5), ``relearn_batch_size`` (4),
``relearn_max_length`` (128 tokens per text), ``relearn_split`` (``targets``: relearn some forget
targets, score the others; ``passages``: a share of the forget passages, score all),
``relearn_fraction`` (0.5: share of targets or passages given to the attacker), ``relearn_texts``
(a text file; default: the forget corpus), ``relearn_seed`` (0), ``relearn_tasks`` (default: every
forget task of ``eval.tasks``).
"""

from __future__ import annotations

import copy
from typing import Any

from retainfirst.errors import RetainFirstError
from retainfirst.evals.attacks.relearn import finetune, sample_share, split_targets, texts_naming
from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import register_task
from retainfirst.evals.tasks.attack import (
    AttackData,
    AttackTask,
    attack_headlines,
    evaluate_tasks,
)
from retainfirst.evals.tasks.base import EvalTask, Headline, TaskContext

PREFIX = "relearn"


def _is_probe_data(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("probes"), dict)


def forget_families(task: EvalTask, data: Any) -> dict[str, list[Any]]:
    """The probe families of a probe task's data (facts, rwku) that feed a forget number."""
    if not _is_probe_data(data):
        return {}
    out = {}
    for family, probes in data["probes"].items():
        headline = task.headline_for(EvalResult(family, {}, 0))
        if headline is not None and headline.role == "forget":
            out[family] = list(probes)
    return out


def restrict_probes(task: EvalTask, data: Any, targets: set[str] | None) -> Any:
    """Probe data reduced to its forget families (and to ``targets`` when given); other data as is."""
    if not _is_probe_data(data):
        return data
    families = {
        family: kept
        for family, probes in forget_families(task, data).items()
        if (kept := [p for p in probes if targets is None or p.target in targets])
    }
    return {**data, "probes": families}


@register_task(PREFIX)
class RelearnTask(AttackTask):
    headline = "recovered"
    label = "relearn rec."
    description = "share of the forgotten forget score a short fine-tune on related text brings back"
    tasks_option = "relearn_tasks"
    target_roles = ("forget",)

    def headlines(self) -> list[Headline]:
        return attack_headlines(PREFIX, "relearning")

    def headline_for(self, result: EvalResult) -> Headline | None:
        return {h.key: h for h in self.headlines()}.get(result.task)

    def options(self, settings: Any) -> dict[str, Any]:
        """The ``eval.relearn_*`` settings (the config checks each one; here, what it cannot)."""
        split, fraction, texts = settings.relearn_split, settings.relearn_fraction, settings.relearn_texts
        if split == "targets" and fraction == 1:
            raise RetainFirstError(
                "config: eval.relearn_fraction must be in (0, 1) with relearn_split=targets "
                f"(some targets must stay unseen), got {fraction}"
            )
        if texts is not None and not texts.strip():
            raise RetainFirstError("config: eval.relearn_texts must be a file name or null")
        return {
            "steps": settings.relearn_steps,
            "lr": settings.relearn_lr,
            "batch_size": settings.relearn_batch_size,
            "max_length": settings.relearn_max_length,
            "split": split,
            "fraction": fraction,
            "texts_file": texts,
            "seed": settings.relearn_seed,
        }

    def forget_material(self, context: TaskContext, texts_file: str | None) -> list[str]:
        """The text the attacker draws from: ``relearn_texts``, else the forget corpus."""
        if texts_file:
            return context.load_texts(texts_file)
        if context.forget_texts:
            return list(context.forget_texts)
        if context.uses("facts"):
            return list(context.source("facts").forget_corpus)
        raise RetainFirstError(
            "eval task relearn needs forget-related text: set eval.relearn_texts (a file under data.dir)"
        )

    def prepare(self, context: TaskContext) -> AttackData:
        from retainfirst.data import tokenize_texts

        data = self.prepare_inner(context)
        opts = data.options
        texts = self.forget_material(context, opts["texts_file"])
        relearned: list[str] = []
        evaluated: list[str] = []
        if opts["split"] == "targets":
            probes = [
                p for t in data.tasks for ps in forget_families(t, data.data[t.id]).values() for p in ps
            ]
            relearned, evaluated = split_targets((p.target for p in probes), opts["fraction"], opts["seed"])
            answers = [p.answer for p in probes if p.target in set(evaluated)]
            texts = texts_naming(texts, relearned, evaluated, answers)
            keep: set[str] | None = set(evaluated)
        else:
            texts = sample_share(texts, opts["fraction"], opts["seed"]) if texts else []
            keep = None
        if not texts:
            raise RetainFirstError(
                f"eval task relearn: no forget text left for relearn_split={opts['split']} (a relearn text "
                "must name a relearned target and no evaluated target or answer); try relearn_split=passages"
            )
        data.data = {t.id: restrict_probes(t, data.data[t.id], keep) for t in data.tasks}
        data.extra = {
            "examples": tokenize_texts(texts, context.tokenizer, max_length=opts["max_length"], pack=False),
            "record": {"texts": len(texts), "relearned_targets": relearned, "evaluated_targets": evaluated},
        }
        if context.workdir is not None:
            from retainfirst.io import atomic_write_json

            record = {**opts, **data.extra["record"], "relearn_texts": texts}
            atomic_write_json(context.workdir / "relearn_texts.json", record)
        self.measure_reference(context, data)
        return data

    def describe(self, data: AttackData) -> str:
        record = data.extra["record"]
        return (
            f"{data.options['steps']} steps on {record['texts']} texts, "
            f"then {', '.join(t.id for t in data.tasks)}"
        )

    def run(self, model: Any, tokenizer: Any, data: AttackData, settings: Any) -> list[EvalResult]:
        if data.is_original(model):
            return []  # the model before unlearning: its scores were measured in prepare
        unlearned = evaluate_tasks(model, tokenizer, data.tasks, data.data, settings)
        attacked_model = copy.deepcopy(model)
        try:
            opts = data.options
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            losses = finetune(
                attacked_model,
                data.extra["examples"],
                pad,
                steps=opts["steps"],
                lr=opts["lr"],
                batch_size=opts["batch_size"],
                seed=opts["seed"],
            )
            attacked = evaluate_tasks(attacked_model, tokenizer, data.tasks, data.data, settings)
        finally:
            del attacked_model
        record = {**data.options, **data.extra["record"], "losses": losses}
        return self.attack_results(PREFIX, data, unlearned, attacked, record)
