"""Membership inference on forget vs retain texts: LOSS, zlib, Min-K % and Min-K++ %, and their AUC.

Every score follows one direction convention: **higher = more member-like** (the model finds the
text more familiar). For a text with scored tokens x_2..x_T (the first token has no prediction),
log p_t = log p(x_t | x_<t) in float32 and NLL = -mean_t log p_t (nats per token):

* ``loss``   = -NLL (the LOSS attack, Yeom et al.; RWKU's ``ll``).
* ``zlib``   = -NLL / zlib(text): Carlini et al. (2021) rank by log-perplexity / zlib entropy,
  where the zlib entropy is the length in bytes of ``zlib.compress(text.encode("utf-8"))``
  (default level); we negate it to keep higher = member. RWKU computes the same ratio. When a text
  is truncated to ``max_length`` tokens, the decoded truncated text is compressed.
* ``mink``   = mean of the lowest ``k`` fraction of log p_t (Min-K % Prob, Shi et al. 2024).
* ``minkpp`` = the same over z_t = (log p_t - mu_t) / sigma_t with mu_t = sum_v p_v log p_v and
  sigma_t = sqrt(sum_v p_v (log p_v)^2 - mu_t^2) under the model's next-token distribution
  (Min-K++ %, Zhang et al. 2024). sigma_t is floored at 1e-6 so a one-hot prediction cannot
  divide by zero.

The lowest ``k`` fraction has max(1, floor(k * #tokens)) tokens (RWKU and the Min-K papers floor;
the floor of one keeps very short texts defined).

Reporting. ``metrics["auc_<score>"]`` is the ROC AUC of separating forget texts (positives,
"members") from retain texts by that score: the probability that a random forget text scores
higher than a random retain text, ties counting one half (Mann-Whitney U). With retain texts that
the model still knows, 0.5 means the forget texts look as familiar as the retain texts and values
below 0.5 mean they look *less* familiar (forgotten); with held-out non-member texts as the second
set (MUSE style), 0.5 after unlearning means the forget texts look unseen. RWKU itself reports the
mean score on the forget set (FM) and on the retain set (RM) rather than an AUC; those means are
in ``breakdown["forget"]`` / ``breakdown["retain"]`` (``metrics`` also repeats the RWKU headline
numbers ``forget_mean_<score>`` / ``retain_mean_<score>``), so both readings are available.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from retainfirst.errors import RetainFirstError
from retainfirst.evals.perplexity import LOGPROB_CHUNK, evaluation_mode, model_device
from retainfirst.evals.results import EvalResult

SCORES = ("loss", "zlib", "mink", "minkpp")
SIGMA_FLOOR = 1e-6
MAX_SAMPLES = 50


def mann_whitney_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """ROC AUC = P(positive > negative) + P(tie) / 2, from average ranks (Mann-Whitney U)."""
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        raise RetainFirstError("AUC needs at least one score on each side (forget and retain)")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise RetainFirstError("AUC got non-finite scores; check the model outputs for NaN/inf")
    values = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    # average 1-based rank of each distinct value: ranks before it + (count + 1) / 2
    first_rank = np.cumsum(counts) - counts
    average_rank = first_rank + (counts + 1) / 2.0
    rank_sum = average_rank[inverse[: pos.size]].sum()
    u_statistic = rank_sum - pos.size * (pos.size + 1) / 2.0
    return float(u_statistic / (pos.size * neg.size))


def lowest_fraction_mean(values: torch.Tensor, k: float) -> float:
    """Mean of the max(1, floor(k * n)) smallest entries of a 1-D tensor."""
    count = max(1, int(values.numel() * k))
    return float(torch.sort(values.double()).values[:count].mean())


def token_statistics(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (log p(target), Min-K++ z-score) per position for ``logits`` [T, V], chunked over T."""
    logprobs = torch.empty(targets.shape[0], dtype=torch.float32, device=logits.device)
    zscores = torch.empty_like(logprobs)
    for start in range(0, targets.shape[0], LOGPROB_CHUNK):
        stop = start + LOGPROB_CHUNK
        log_dist = torch.log_softmax(logits[start:stop].float(), dim=-1)
        probs = log_dist.exp()
        # 0 * log 0 = 0 even where a logit is -inf
        plogp = torch.where(probs > 0, probs * log_dist, 0.0)
        plog2p = torch.where(probs > 0, plogp * log_dist, 0.0)
        mu = plogp.sum(-1)
        sigma = (plog2p.sum(-1) - mu.square()).clamp_min(0.0).sqrt().clamp_min(SIGMA_FLOOR)
        picked = log_dist.gather(-1, targets[start:stop, None]).squeeze(-1)
        logprobs[start:stop] = picked
        zscores[start:stop] = (picked - mu) / sigma
    return logprobs, zscores


def score_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int = 512,
    batch_size: int = 8,
    k: float = 0.2,
    name: str = "texts",
) -> list[dict[str, float]]:
    """The four membership scores (and ``nll``, ``tokens``, ``zlib_bytes``) of each text."""
    if isinstance(texts, str):
        raise RetainFirstError(f"{name} must be a list of strings, not a single string")
    full_ids = [list(tokenizer(text, add_special_tokens=True)["input_ids"]) for text in texts]
    encoded = [ids[:max_length] for ids in full_ids]
    for index, ids in enumerate(encoded):
        if len(ids) < 2:
            raise RetainFirstError(
                f"{name}[{index}] has fewer than 2 tokens; membership scores need at least one "
                "predicted token: drop empty or one-word texts"
            )
    lengths = [len(ids) for ids in encoded]
    order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model_device(model)
    results: list[dict[str, float]] = [{} for _ in texts]
    with evaluation_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(lengths[i] for i in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, index in enumerate(rows):
                input_ids[row, : lengths[index]] = torch.tensor(encoded[index])
                attention_mask[row, : lengths[index]] = 1
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            for row, index in enumerate(rows):
                length = lengths[index]
                logprobs, zscores = token_statistics(logits[row, : length - 1], input_ids[row, 1:length])
                scored_text = texts[index]
                if len(full_ids[index]) > length:
                    scored_text = tokenizer.decode(encoded[index], skip_special_tokens=True)
                results[index] = _text_scores(logprobs, zscores, scored_text, k)
    return results


def _text_scores(logprobs: torch.Tensor, zscores: torch.Tensor, text: str, k: float) -> dict[str, float]:
    nll = float(-logprobs.double().mean())
    zlib_bytes = len(zlib.compress(text.encode("utf-8")))
    return {
        "loss": -nll,
        "zlib": -nll / zlib_bytes,
        "mink": lowest_fraction_mean(logprobs, k),
        "minkpp": lowest_fraction_mean(zscores, k),
        "nll": nll,
        "tokens": float(logprobs.numel()),
        "zlib_bytes": float(zlib_bytes),
    }


def evaluate_mia(
    model: Any,
    tokenizer: Any,
    forget_texts: Sequence[str],
    retain_texts: Sequence[str],
    max_length: int = 512,
    batch_size: int = 8,
    k: float = 0.2,
    task: str = "mia",
) -> EvalResult:
    """AUC of each membership score at telling forget texts (members) from retain texts.

    See the module docstring for the scores, the direction convention and how to read the AUC.
    """
    if not 0.0 < k <= 1.0:
        raise RetainFirstError(f"k must be a fraction in (0, 1], got {k}")
    if max_length < 2 or batch_size < 1:
        raise RetainFirstError("max_length must be at least 2 and batch_size at least 1")
    if not forget_texts or not retain_texts:
        raise RetainFirstError("evaluate_mia needs at least one forget text and one retain text")
    options = {"max_length": max_length, "batch_size": batch_size, "k": k}
    forget = score_texts(model, tokenizer, forget_texts, name="forget_texts", **options)
    retain = score_texts(model, tokenizer, retain_texts, name="retain_texts", **options)
    metrics: dict[str, float] = {}
    for score in SCORES:
        metrics[f"auc_{score}"] = mann_whitney_auc([s[score] for s in forget], [s[score] for s in retain])
    breakdown = {"forget": _means(forget), "retain": _means(retain)}
    for score in SCORES:
        metrics[f"forget_mean_{score}"] = breakdown["forget"][score]
        metrics[f"retain_mean_{score}"] = breakdown["retain"][score]
    samples = [
        {"set": name, "text": text[:200], **scores}
        for name, texts, scored in (("forget", forget_texts, forget), ("retain", retain_texts, retain))
        for text, scores in list(zip(texts, scored, strict=True))[: MAX_SAMPLES // 2]
    ]
    return EvalResult(
        task=task,
        metrics=metrics,
        n=len(forget) + len(retain),
        settings={
            "members": "forget_texts",
            "non_members": "retain_texts",
            "n_forget": len(forget),
            "n_retain": len(retain),
            "k": k,
            "max_length": max_length,
            "batch_size": batch_size,
            "direction": "higher score = more member-like; AUC = P(forget score > retain score)",
            "zlib": "-(mean NLL in nats/token) / len(zlib.compress(utf-8 text)) bytes",
        },
        breakdown=breakdown,
        samples=samples,
    )


def _means(scored: list[dict[str, float]]) -> dict[str, float]:
    keys = (*SCORES, "nll", "tokens")
    return {key: float(np.mean([s[key] for s in scored])) for key in keys} | {"n": float(len(scored))}
