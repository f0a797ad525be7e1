"""TOFU's metrics (Maini et al. 2024, arXiv 2401.06121), as computed by its reference code.

Sources: ``locuslab/tofu`` ``evaluate_util.py`` (losses, generation, ROUGE), ``utils.py``
(``get_model_utility``, ``get_forget_quality``), ``data_module.py`` (prompt and answer tokens).

Per question q with answer a, every probability is length-normalised, P(a|q)^(1/|a|) =
exp(-mean NLL of a's tokens), where a's tokens are those after the prompt plus one eos token
(TOFU's labels include the eos it appends). Per evaluation set (forget, retain, real authors,
world facts):

* **Probability**: forget / retain: mean of P(a|q)^(1/|a|). Real authors / world facts: mean of
  P(a|q)^(1/|a|) / (P(a|q)^(1/|a|) + sum_j P(a_j|q)^(1/|a_j|)) over the perturbed answers a_j.
* **ROUGE**: ROUGE-L recall (``rouge_score``, Porter stemmer) of the greedy answer against a.
* **Truth ratio**: R = mean_j P(a_j|q)^(1/|a_j|) / P(b|q)^(1/|b|) with b the paraphrased answer
  (forget / retain) or a itself (real authors / world facts). The set's statistic is
  mean(min(R, 1/R)) on the forget set and mean(max(0, 1 - R)) on the others.
* **Model utility**: the harmonic mean of the nine retain / real-author / world-fact numbers.
* **Forget quality**: the p-value of the two-sample Kolmogorov-Smirnov test between the unlearned
  and the retain model's per-question statistic on the forget set. TOFU's ``get_forget_quality``
  tests exp(mean_j loss(a_j) - loss(b)) = P(b)^(1/|b|) / geometric-mean_j P(a_j)^(1/|a_j|) (the
  geometric mean of the perturbed probabilities, not the arithmetic mean of R); we test exactly that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from rouge_score import rouge_scorer

from retainfirst.data.tofu import TEMPLATES, format_question
from retainfirst.errors import RetainFirstError
from retainfirst.evals.generation import generate_greedy
from retainfirst.evals.perplexity import evaluation_mode, model_device, token_logprobs
from retainfirst.evals.results import EvalResult

FORGET, RETAIN, REAL_AUTHORS, WORLD_FACTS = "forget", "retain", "real_authors", "world_facts"
UTILITY_SETS = (RETAIN, REAL_AUTHORS, WORLD_FACTS)
STATISTICS = ("prob", "rougeL_recall", "truth_ratio")


# ----------------------------------------------------------------------------------------------
# Pure metrics over per-token losses (mean NLL of an answer's tokens, nats)


def normalised_probability(loss: float) -> float:
    """P(a|q)^(1/|a|) from the mean NLL of a's tokens."""
    return math.exp(-loss)


def truth_ratio(base_loss: float, perturbed_losses: Sequence[float]) -> float:
    """R_truth = mean_j P(a_j)^(1/|a_j|) / P(b)^(1/|b|) (TOFU paper, eq. 1; ``get_model_utility``)."""
    if not perturbed_losses:
        raise RetainFirstError("the truth ratio needs at least one perturbed answer")
    return float(np.mean(np.exp(-np.asarray(perturbed_losses, dtype=np.float64)))) / math.exp(-base_loss)


def forget_quality_statistic(base_loss: float, perturbed_losses: Sequence[float]) -> float:
    """exp(mean_j loss(a_j) - loss(b)): the per-question value TOFU's ``get_forget_quality`` tests."""
    return math.exp(float(np.mean(np.asarray(perturbed_losses, dtype=np.float64))) - base_loss)


def probability_statistic(
    kind: str, answer_losses: Sequence[float], perturbed: Sequence[Sequence[float]]
) -> float:
    """The set's Probability: plain on forget / retain, normalised over the options elsewhere."""
    true = np.exp(-np.asarray(answer_losses, dtype=np.float64))
    if kind in (FORGET, RETAIN):
        return float(true.mean())
    false = np.asarray([np.exp(-np.asarray(p, dtype=np.float64)).sum() for p in perturbed])
    return float(np.mean(true / (true + false)))


def truth_ratio_statistic(kind: str, ratios: Sequence[float]) -> float:
    """mean(min(R, 1/R)) on the forget set, mean(max(0, 1 - R)) on the others (``get_model_utility``)."""
    values = np.asarray(ratios, dtype=np.float64)
    if kind == FORGET:
        return float(np.mean(np.minimum(values, 1.0 / values)))
    return float(np.mean(np.maximum(0.0, 1.0 - values)))


def model_utility(statistics: Mapping[str, Mapping[str, float]]) -> float:
    """Harmonic mean of prob / ROUGE / truth-ratio of retain, real authors and world facts (scipy's hmean)."""
    from scipy.stats import hmean

    values = [float(statistics[s][k]) for s in UTILITY_SETS for k in STATISTICS]
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise RetainFirstError(f"model utility needs nine finite non-negative numbers, got {values}")
    if any(v == 0 for v in values):
        return 0.0  # the harmonic mean's limit; scipy warns and returns 0 too
    return float(hmean(values))


def forget_quality(unlearned: Sequence[float], retain: Sequence[float]) -> tuple[float, float]:
    """(p-value, KS statistic) of ``scipy.stats.ks_2samp`` between the two models' per-question values."""
    from scipy.stats import ks_2samp

    if not unlearned or not retain:
        raise RetainFirstError("forget quality needs per-question values of both models")
    result = ks_2samp(np.asarray(unlearned, dtype=np.float64), np.asarray(retain, dtype=np.float64))
    return float(result.pvalue), float(result.statistic)


# ----------------------------------------------------------------------------------------------
# Model scoring


def answer_losses(
    model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], *, batch_size: int = 16
) -> list[float]:
    """Mean NLL per token of each answer after its prompt, as TOFU's ``get_batch_loss`` / token count.

    Tokens: ``tokenizer(prompt + answer)`` with special tokens plus an eos; the first
    ``len(tokenizer(prompt))`` are the question's and are not scored (TOFU's label masking).
    """
    if len(prompts) != len(answers):
        raise RetainFirstError(f"answer_losses: {len(prompts)} prompts but {len(answers)} answers")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise RetainFirstError("TOFU scoring appends an eos token; the tokenizer has none")
    rows: list[tuple[list[int], int]] = []
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = [*tokenizer(prompt + answer, add_special_tokens=True)["input_ids"], eos]
        start = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if start >= len(ids) or start < 1:
            raise RetainFirstError(f"the answer {answer!r} has no tokens after its prompt")
        rows.append((ids, start))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = model_device(model)
    losses = [0.0] * len(rows)
    with evaluation_mode(model):
        for begin in range(0, len(order), batch_size):
            chunk = order[begin : begin + batch_size]
            width = max(len(rows[i][0]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                ids = rows[i][0]
                input_ids[r, : len(ids)] = torch.tensor(ids)
                mask[r, : len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            for r, i in enumerate(chunk):
                ids, start = rows[i]
                targets = input_ids[r, start : len(ids)].to(device)
                logprobs = token_logprobs(logits[r, start - 1 : len(ids) - 1], targets)
                losses[i] = float(-logprobs.double().mean())
    return losses


def rouge_l_recalls(generated: Sequence[str], answers: Sequence[str]) -> list[float]:
    """ROUGE-L recall of each answer by its generation (``rouge_score`` with the Porter stemmer, as TOFU)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [float(scorer.score(a, g)["rougeL"].recall) for g, a in zip(generated, answers, strict=True)]


def set_statistics(
    kind: str,
    answer_loss: Sequence[float],
    base_loss: Sequence[float],
    perturbed_loss: Sequence[Sequence[float]],
    rouge: Sequence[float],
) -> dict[str, float]:
    """Probability, ROUGE and truth-ratio statistic of one evaluation set from per-question values."""
    ratios = [truth_ratio(b, p) for b, p in zip(base_loss, perturbed_loss, strict=True)]
    return {
        "prob": probability_statistic(kind, answer_loss, perturbed_loss),
        "rougeL_recall": float(np.mean(rouge)),
        "truth_ratio": truth_ratio_statistic(kind, ratios),
        "truth_ratio_mean": float(np.mean(ratios)),
    }


def retain_reference_values(payload: Any) -> list[float]:
    """Per-question forget-quality values of the retain model from a saved evaluation.

    Accepts ``results.json`` of ``retainfirst eval --tasks tofu`` (its ``tofu_forget`` result) and TOFU's
    own ``eval_log_aggregated.json`` (key ``eval_log_forget.json``) or ``eval_log_forget.json``.
    """
    if isinstance(payload, Mapping) and isinstance(payload.get("results"), list):
        for result in payload["results"]:
            if isinstance(result, Mapping) and result.get("task") == "tofu_forget":
                breakdown = result.get("breakdown") or {}
                base, perturbed = breakdown.get("base_loss"), breakdown.get("perturbed_loss_mean")
                if isinstance(base, Mapping) and isinstance(perturbed, Mapping) and base:
                    keys = sorted(base, key=int)
                    return [math.exp(float(perturbed[k]) - float(base[k])) for k in keys]
        raise RetainFirstError("the saved results hold no tofu_forget result with per-question losses")
    if isinstance(payload, Mapping) and "eval_log_forget.json" in payload:
        payload = payload["eval_log_forget.json"]
    if (
        isinstance(payload, Mapping)
        and "avg_paraphrased_loss" in payload
        and "average_perturb_loss" in payload
    ):
        base, perturbed = payload["avg_paraphrased_loss"], payload["average_perturb_loss"]
        keys = sorted(base, key=int)
        return [forget_quality_statistic(float(base[k]), [float(v) for v in perturbed[k]]) for k in keys]
    raise RetainFirstError(
        "unrecognised retain-model evaluation: expected retainfirst's results.json "
        "or TOFU's eval_log_aggregated.json"
    )


# ----------------------------------------------------------------------------------------------
# The whole evaluation


def _prompts(items: Sequence[Any], template: str) -> tuple[list[str], list[str]]:
    """(scoring prompts, generation prompts). TOFU scores answers after question tags + answer tag,
    and generates from the text before its split symbol (the answer tag is dropped for the "qa"
    format, kept for llama2 whose answer tag is empty)."""
    start, end, _ = TEMPLATES[template]
    scoring = [format_question(item.question, template) for item in items]
    generation = [f"{start}{item.question}{end}" for item in items]
    return scoring, generation


def score_set(
    model: Any,
    tokenizer: Any,
    kind: str,
    items: Sequence[Any],
    *,
    template: str = "llama2",
    batch_size: int = 16,
    max_new_tokens: int = 200,
) -> tuple[dict[str, float], dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Statistics, per-question losses (``breakdown``) and samples of one set of ``TofuItem``s."""
    if not items:
        raise RetainFirstError(f"the TOFU {kind} set is empty")
    prompts, generation_prompts = _prompts(items, template)
    answer_loss = answer_losses(model, tokenizer, prompts, [i.answer for i in items], batch_size=batch_size)
    if kind in (FORGET, RETAIN):
        base_loss = answer_losses(
            model, tokenizer, prompts, [i.base_answer for i in items], batch_size=batch_size
        )
    else:
        base_loss = list(answer_loss)
    flat_prompts = [p for p, item in zip(prompts, items, strict=True) for _ in item.perturbed_answers]
    flat_answers = [a for item in items for a in item.perturbed_answers]
    flat = answer_losses(model, tokenizer, flat_prompts, flat_answers, batch_size=batch_size)
    perturbed_loss: list[list[float]] = []
    for item in items:
        perturbed_loss.append(flat[: len(item.perturbed_answers)])
        flat = flat[len(item.perturbed_answers) :]
    generated = generate_greedy(
        model,
        tokenizer,
        generation_prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop_at_newline=False,
    )
    rouge = rouge_l_recalls(generated, [i.answer for i in items])
    stats = set_statistics(kind, answer_loss, base_loss, perturbed_loss, rouge)
    breakdown = {
        "answer_loss": {str(k): v for k, v in enumerate(answer_loss)},
        "base_loss": {str(k): v for k, v in enumerate(base_loss)},
        "perturbed_loss_mean": {str(k): float(np.mean(p)) for k, p in enumerate(perturbed_loss)},
        "rougeL_recall": {str(k): v for k, v in enumerate(rouge)},
    }
    samples = [
        {"question": i.question, "answer": i.answer, "generated": g, "rougeL_recall": r}
        for i, g, r in list(zip(items, generated, rouge, strict=True))[:25]
    ]
    return stats, breakdown, samples


def evaluate_tofu(
    model: Any,
    tokenizer: Any,
    data: Any,
    *,
    template: str = "llama2",
    batch_size: int = 16,
    max_new_tokens: int = 200,
    reference: Sequence[float] | None = None,
    reference_note: str = "",
) -> list[EvalResult]:
    """``tofu_forget``, ``tofu_retain``, ``tofu_real_authors``, ``tofu_world_facts`` (prob, ROUGE-L
    recall, truth ratio), ``tofu_model_utility`` and ``tofu_forget_quality`` (None without a
    ``reference``: the retain model's per-question values, see :func:`retain_reference_values`)."""
    common = {
        "split": data.split,
        "template": template,
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
    }
    results: list[EvalResult] = []
    statistics: dict[str, dict[str, float]] = {}
    for kind in (FORGET, RETAIN, REAL_AUTHORS, WORLD_FACTS):
        items = data.sets[kind]
        stats, breakdown, samples = score_set(
            model,
            tokenizer,
            kind,
            items,
            template=template,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        )
        statistics[kind] = stats
        truth = "mean(min(R, 1/R))" if kind == FORGET else "mean(max(0, 1 - R))"
        results.append(
            EvalResult(
                f"tofu_{kind}",
                stats,
                n=len(items),
                settings={**common, "truth_ratio": truth},
                breakdown=breakdown,
                samples=samples,
            )
        )
    utility = {f"{s}_{k}": statistics[s][k] for s in UTILITY_SETS for k in STATISTICS}
    results.append(
        EvalResult(
            "tofu_model_utility",
            {"model_utility": model_utility(statistics), **utility},
            n=sum(len(data.sets[s]) for s in UTILITY_SETS),
            settings={
                **common,
                "definition": "harmonic mean of the nine retain/real-author/world-fact numbers",
            },
        )
    )
    forget_values = [
        math.exp(results[0].breakdown["perturbed_loss_mean"][k] - results[0].breakdown["base_loss"][k])
        for k in results[0].breakdown["base_loss"]
    ]
    quality: dict[str, float | None] = {"forget_quality": None, "ks_statistic": None}
    note = reference_note
    if reference:
        quality["forget_quality"], quality["ks_statistic"] = forget_quality(forget_values, reference)
        note = note or "KS test against the retain model's saved evaluation"
    results.append(
        EvalResult(
            "tofu_forget_quality",
            quality,
            n=len(forget_values),
            settings={**common, "reference_n": len(reference or []), "note": note},
        )
    )
    return results
