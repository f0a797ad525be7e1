"""``muse``: MUSE's VerbMem, KnowMem and PrivLeak on a MUSE corpus folder (News or Books).

Reads ``eval.muse_dir`` (else ``data.dir``; layouts in :mod:`retainfirst.data.muse`). Results:
``muse_verbmem_forget`` and ``muse_knowmem_forget`` (ROUGE-L F1; both feed the forget score, lower
= more forgotten), ``muse_knowmem_retain`` (a utility), ``muse_privleak`` (a diagnostic; headline
|PrivLeak|, the signed value is in its metrics). PrivLeak compares the AUC with the retrained model's:
from ``eval.muse_retrain_results`` (``results.json`` of ``retainfirst eval --tasks muse`` on the
retrained model), else MUSE's published AUC for ``eval.muse_corpus`` (news / books; valid for MUSE's
own Llama-2 target and retrained models only), else null with a note.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retainfirst.errors import RetainFirstError
from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import register_task
from retainfirst.evals.tasks.base import EvalTask, Headline, TaskContext, limited

VERBMEM = Headline(
    "muse_verbmem",
    "forget",
    "rougeL_f1",
    higher_is_better=False,
    label="MUSE VerbMem",
    precedence=1,
    description="MUSE VerbMem: ROUGE-L F1 of continuations of forget-set prefixes (lower = forgotten)",
)
KNOWMEM_FORGET = Headline(
    "muse_knowmem_forget",
    "forget",
    "rougeL_f1",
    higher_is_better=False,
    label="MUSE KnowMem forget",
    precedence=1,
    description="MUSE KnowMem on the forget QA: ROUGE-L F1 of few-shot answers (lower = forgotten)",
)
KNOWMEM_RETAIN = Headline(
    "muse_knowmem_retain",
    "utility",
    "rougeL_f1",
    higher_is_better=True,
    label="MUSE KnowMem retain",
    description="MUSE KnowMem on the retain QA (utility preservation)",
)
PRIVLEAK = Headline(
    "muse_privleak",
    "diagnostic",
    "privleak_abs",
    higher_is_better=False,
    label="MUSE |PrivLeak| %",
    fmt="{:.1f}",
    description="MUSE |PrivLeak|: Min-40% AUC forget vs holdout, relative to the retrained model's",
)
BY_RESULT = {
    "muse_verbmem_forget": VERBMEM,
    "muse_knowmem_forget": KNOWMEM_FORGET,
    "muse_knowmem_retain": KNOWMEM_RETAIN,
    "muse_privleak": PRIVLEAK,
}


def muse_folder(config: Any) -> str | None:
    return config.eval.muse_dir or config.data.dir


def retrain_auc_from(path: str) -> float:
    """The retrained model's PrivLeak AUC from its ``results.json`` (``retainfirst eval --tasks muse``)."""
    file = Path(path)
    if not file.is_file():
        raise RetainFirstError(f"eval.muse_retrain_results: {path} does not exist")
    try:
        payload = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RetainFirstError(f"eval.muse_retrain_results: {path} is not valid JSON ({exc.msg})") from None
    for result in payload.get("results", []) if isinstance(payload, dict) else []:
        if isinstance(result, dict) and result.get("task") == "muse_privleak":
            auc = (result.get("metrics") or {}).get("auc")
            if isinstance(auc, int | float) and auc > 0:
                return float(auc)
    raise RetainFirstError(f"eval.muse_retrain_results: {path} holds no muse_privleak result with an AUC > 0")


@register_task("muse")
class MuseTask(EvalTask):
    role = "forget"
    headline = "rougeL_f1"
    higher_is_better = False
    label = "MUSE VerbMem"
    description = VERBMEM.description

    def headlines(self) -> list[Headline]:
        return [VERBMEM, KNOWMEM_FORGET, KNOWMEM_RETAIN, PRIVLEAK]

    def headline_for(self, result: EvalResult) -> Headline | None:
        return BY_RESULT.get(result.task)

    def check_config(self, config: Any) -> None:
        if not muse_folder(config):
            raise RetainFirstError(
                "config: eval task muse needs data.dir or eval.muse_dir (the MUSE corpus folder)"
            )

    def prepare(self, context: TaskContext) -> dict[str, Any]:
        from retainfirst.data.muse import load_muse
        from retainfirst.evals.muse import PUBLISHED_RETRAIN_AUC

        config = context.config
        self.check_config(config)
        data = load_muse(muse_folder(config))
        limit = config.eval.muse_limit
        for name in ("verbmem", "knowmem_forget", "knowmem_retain", "privleak_forget", "privleak_holdout"):
            setattr(data, name, limited(getattr(data, name), limit))
        path, corpus = config.eval.muse_retrain_results, config.eval.muse_corpus
        if path:
            retrain_auc, source = retrain_auc_from(path), f"retrained model's evaluation {path}"
        elif corpus:
            retrain_auc = PUBLISHED_RETRAIN_AUC[corpus]
            source = f"MUSE's published AUC of muse-bench/MUSE-{corpus.capitalize()}_retrain (constants.py)"
        else:
            retrain_auc, source = (
                None,
                "no eval.muse_retrain_results or eval.muse_corpus: PrivLeak not computed",
            )
        return {"data": data, "retrain_auc": retrain_auc, "source": source}

    def describe(self, data: dict[str, Any]) -> str:
        counts = data["data"].counts()
        return ", ".join(f"{k} {v}" for k, v in counts.items() if v)

    def run(self, model: Any, tokenizer: Any, data: dict[str, Any], settings: Any) -> list[EvalResult]:
        from retainfirst.evals import muse

        bundle = data["data"]
        batch = settings.batch_size
        results = []
        verb = muse.verbmem(model, tokenizer, bundle.verbmem, batch_size=batch)
        results.append(_result("muse_verbmem_forget", verb, {"max_new_tokens": muse.VERBMEM_MAX_NEW_TOKENS}))
        for split in ("forget", "retain"):
            qa, icl = getattr(bundle, f"knowmem_{split}"), getattr(bundle, f"knowmem_{split}_icl")
            if qa:
                scored = muse.knowmem(model, tokenizer, qa, icl, batch_size=batch)
                extra = {"max_new_tokens": muse.KNOWMEM_MAX_NEW_TOKENS, "icl_examples": len(icl)}
                results.append(_result(f"muse_knowmem_{split}", scored, extra))
        max_length = settings.muse_max_length
        options = {"max_length": max_length, "batch_size": batch}
        forget = muse.mink_scores(model, tokenizer, bundle.privleak_forget, name="privleak forget", **options)
        holdout = muse.mink_scores(
            model, tokenizer, bundle.privleak_holdout, name="privleak holdout", **options
        )
        auc = muse.privleak_auc(forget, holdout)
        leak = muse.privleak(auc, data["retrain_auc"]) if data["retrain_auc"] else None
        metrics = {
            "auc": auc,
            "retrain_auc": data["retrain_auc"],
            "privleak": leak,
            "privleak_abs": abs(leak) if leak is not None else None,
        }
        settings_out = {
            "score": f"Min-{int(muse.MINK_FRACTION * 100)}% Prob",
            "auc": "P(holdout score > forget score) (MUSE forget_holdout)",
            "retrain_auc_source": data["source"],
            "max_length": max_length,
        }
        results.append(
            EvalResult("muse_privleak", metrics, n=len(forget) + len(holdout), settings=settings_out)
        )
        return results


def _result(task: str, scored: dict[str, Any], settings: dict[str, Any]) -> EvalResult:
    return EvalResult(
        task,
        {"rougeL_f1": scored["rougeL_f1"], "rougeL_recall": scored["rougeL_recall"]},
        n=scored["n"],
        settings={"decoding": "greedy", "metric": "ROUGE-L F1 (rouge_score, no stemmer)", **settings},
        samples=scored["samples"],
    )
