"""MUSE's metrics (Shi et al. 2024, arXiv 2407.06460), as computed by its reference code.

Sources: ``swj0419/muse_bench`` ``eval.py``, ``constants.py`` and ``metrics/{verbmem,knowmem,privleak,
logger}.py``; the checkpoint rule from its README (``get_best_forget_quality.py``).

* **VerbMem** (forget set): greedy continuation (128 new tokens) of each ``prompt``; the reference
  is ``gt`` cut to its first 128 tokens (encoded with special tokens, decoded without them, as
  MUSE does). Score: ROUGE-L F1 (``rouge_score``, no stemmer; MUSE's ``mean_rougeL`` is the
  F-measure), mean over prompts.
* **KnowMem** (forget and retain QA): few-shot prompt ``"Question: {q}\\nAnswer: {a}\\n\\n"`` per
  in-context example, then ``"Question: {q}\\nAnswer: "``; greedy, 32 new tokens, the answer cut
  before the first ``"\\n\\n"``, ``"\\nQuestion"`` or ``"Question:"``; ROUGE-L F1 against the answer.
* **PrivLeak**: Min-40 % Prob of each forget and holdout text; AUC of the ROC that labels holdout
  texts 1 and forget texts 0 with the Min-40 % log-likelihood as the score (MUSE's key
  ``forget_holdout_Min-40%``): P(holdout text scores higher than forget text). PrivLeak =
  (AUC - AUC_retrain) / AUC_retrain x 100: about 0 like the retrained model, strongly negative when
  the forget texts still look like members (under-unlearning), positive when over-unlearned.
* **Checkpoint selection**: among checkpoints in order of increasing unlearning, the first whose
  KnowMem on the forget set is at most the retrained model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rouge_score import rouge_scorer

from retainfirst.errors import RetainFirstError
from retainfirst.evals.generation import generate_greedy
from retainfirst.evals.mia import mann_whitney_auc, score_texts

MINK_FRACTION = 0.4
VERBMEM_MAX_NEW_TOKENS = 128
KNOWMEM_MAX_NEW_TOKENS = 32
KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")
# AUC of MUSE's retrained models (muse-bench/MUSE-{News,Books}_retrain) for forget_holdout_Min-40%,
# from muse_bench constants.py (AUC_RETRAIN).
PUBLISHED_RETRAIN_AUC = {"news": 0.47719999999999996, "books": 0.5392999999999999}


def rouge_l(generated: Sequence[str], references: Sequence[str]) -> list[tuple[float, float]]:
    """(F1, recall) of ROUGE-L per pair, ``rouge_score`` without stemming, as MUSE's RougeEvalLogger."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r, g)["rougeL"] for g, r in zip(generated, references, strict=True)]
    return [(float(s.fmeasure), float(s.recall)) for s in scores]


def knowmem_prompt(question: str, icl: Sequence[tuple[str, str]]) -> str:
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in icl)
    return shots + f"Question: {question}\nAnswer: "


def cut_answer(text: str) -> str:
    for stop in KNOWMEM_STOPS:
        text = text.split(stop)[0]
    return text


def truncate_reference(tokenizer: Any, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)


def verbmem(
    model: Any,
    tokenizer: Any,
    items: Sequence[tuple[str, str]],
    *,
    max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Mean ROUGE-L F1 (and recall) of greedy continuations against the truncated ground truth."""
    if not items:
        raise RetainFirstError("VerbMem needs at least one (prompt, gt) pair")
    outputs = generate_greedy(
        model,
        tokenizer,
        [p for p, _ in items],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        stop_at_newline=False,
    )
    references = [truncate_reference(tokenizer, gt, max_new_tokens) for _, gt in items]
    scores = rouge_l(outputs, references)
    return _summary(scores, [p for p, _ in items], references, outputs)


def knowmem(
    model: Any,
    tokenizer: Any,
    qa: Sequence[tuple[str, str]],
    icl: Sequence[tuple[str, str]] = (),
    *,
    max_new_tokens: int = KNOWMEM_MAX_NEW_TOKENS,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Mean ROUGE-L F1 of few-shot greedy answers (cut at the next question) against the answers."""
    if not qa:
        raise RetainFirstError("KnowMem needs at least one (question, answer) pair")
    prompts = [knowmem_prompt(q, icl) for q, _ in qa]
    outputs = generate_greedy(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, stop_at_newline=False
    )
    answers = [cut_answer(o) for o in outputs]
    return _summary(rouge_l(answers, [a for _, a in qa]), [q for q, _ in qa], [a for _, a in qa], answers)


def _summary(scores, prompts, references, outputs) -> dict[str, Any]:
    f1 = [s[0] for s in scores]
    recall = [s[1] for s in scores]
    samples = [
        {"prompt": p[-300:], "reference": r[:300], "generated": o[:300], "rougeL_f1": s[0]}
        for p, r, o, s in list(zip(prompts, references, outputs, scores, strict=True))[:25]
    ]
    return {
        "rougeL_f1": sum(f1) / len(f1),
        "rougeL_recall": sum(recall) / len(recall),
        "n": len(f1),
        "samples": samples,
    }


def privleak_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """MUSE's forget_holdout AUC: P(holdout score > forget score), ties one half (scores: higher = member)."""
    return mann_whitney_auc(holdout_scores, forget_scores)


def privleak(auc: float, retrain_auc: float) -> float:
    """(AUC - AUC_retrain) / AUC_retrain x 100 (MUSE eval.py)."""
    if not retrain_auc > 0:
        raise RetainFirstError(f"the retrained model's AUC must be > 0, got {retrain_auc}")
    return (auc - retrain_auc) / retrain_auc * 100.0


def mink_scores(
    model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int, batch_size: int, name: str
) -> list[float]:
    """Min-40 % Prob of each text: mean of its lowest 40 % token log-probabilities (higher = member)."""
    scored = score_texts(
        model, tokenizer, texts, max_length=max_length, batch_size=batch_size, k=MINK_FRACTION, name=name
    )
    return [s["mink"] for s in scored]


def select_checkpoint(knowmem_forget: Sequence[float], retrain_knowmem_forget: float) -> int | None:
    """Index of the first checkpoint (ordered by increasing unlearning: steps, epochs or alpha) whose
    forget-set KnowMem is at most the retrained model's; None when none reaches it (MUSE README)."""
    for index, score in enumerate(knowmem_forget):
        if score <= retrain_knowmem_forget:
            return index
    return None
