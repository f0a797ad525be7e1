"""Token-weighted perplexity on held-out texts, and the scoring helpers the other evaluations share.

Perplexity = exp(total NLL / total scored tokens) over all documents (not a mean of per-document
perplexities, which would overweight short documents). Token ``t`` is scored by the model's
prediction from tokens ``< t`` of the same document; a document's first token has no prediction
and is never scored. Padding is excluded through the attention mask (never the pad id: pad == eos
for SmolLM2).

Documents longer than ``max_length`` tokens are split into windows of at most ``max_length`` that
advance by ``stride`` tokens; each window scores only the tokens no earlier window scored, so the
overlap is extra context (Hugging Face's sliding-window recipe). ``stride=None`` means
``max_length - 1``: consecutive windows share one token, so every token after a document's first
is scored exactly once, with the context of its own window only. (``stride == max_length`` leaves
the first token of every later window unscored, as in that recipe.) ``max_length`` is capped at the
model's context (``max_position_embeddings``, else the tokenizer's ``model_max_length``), with a
warning: beyond it the windows only cost memory.

On CPU a float32 model's Linears (LM head included) run on oneDNN (``evals.cpu_linear``,
``onednn=False`` to turn off): 1.11x on SmolLM2-135M, 50 texts of ~700 tokens in 512-token windows
(2026-12-01, 3 alternating pairs, perplexity within 8e-8); ``settings["linear_backend"]`` says which ran.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from retainfirst.errors import RetainFirstError
from retainfirst.evals.cpu_linear import linear_backend, onednn_linear
from retainfirst.evals.results import EvalResult

logger = logging.getLogger(__name__)

# Context sizes above this are "unknown" markers (transformers' VERY_LARGE_INTEGER), not real limits.
SANE_CONTEXT = 10_000_000
_warned_caps: set[tuple[int, int]] = set()

# positions per float32 log-softmax slice: bounds the extra memory to CHUNK x vocab floats
LOGPROB_CHUNK = 256


@contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` and no autograd inside; the previous training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float32 log p(target) per position for ``logits`` [T, V] and ``targets`` [T], chunked over T."""
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, targets.shape[0], LOGPROB_CHUNK):
        chunk = logits[start : start + LOGPROB_CHUNK].float()
        picked = chunk.gather(-1, targets[start : start + LOGPROB_CHUNK, None]).squeeze(-1)
        out[start : start + LOGPROB_CHUNK] = picked - torch.logsumexp(chunk, dim=-1)
    return out


def tokenize_documents(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text with the tokenizer's usual special tokens (BOS where it adds one)."""
    if isinstance(texts, str):
        raise RetainFirstError("texts must be a list of strings, not a single string")
    return [list(tokenizer(text, add_special_tokens=True)["input_ids"]) for text in texts]


def model_context_length(model: Any, tokenizer: Any = None) -> int | None:
    """The longest sequence the model was built for: its config's position limit, else the tokenizer's."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and 1 < value < SANE_CONTEXT:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 1 < value < SANE_CONTEXT:
        return value
    return None


def cap_to_context(max_length: int, model: Any, tokenizer: Any = None) -> int:
    """``max_length`` capped at the model's context (warned once per value): longer windows only cost
    memory (attention grows with the square of the length) and score positions the model never saw."""
    context = model_context_length(model, tokenizer)
    if context is None or max_length <= context:
        return max_length
    if (max_length, context) not in _warned_caps:
        _warned_caps.add((max_length, context))
        logger.warning(
            "perplexity: max_length %d is longer than the model's context of %d tokens; using %d",
            max_length,
            context,
            context,
        )
    return context


@dataclass(frozen=True)
class _Window:
    document: int
    token_ids: list[int]
    score_from: int  # first window position whose token is scored (>= 1)


def _windows(documents: list[list[int]], max_length: int, stride: int | None) -> list[_Window]:
    step = max_length - 1 if stride is None else stride
    windows = []
    for index, ids in enumerate(documents):
        scored_until = 1  # document position of the next token still to score
        for begin in range(0, len(ids), step):
            end = min(begin + max_length, len(ids))
            score_from = max(scored_until, begin + 1)
            if score_from < end:
                windows.append(_Window(index, ids[begin:end], score_from - begin))
            scored_until = max(scored_until, end)
            if end == len(ids):
                break
    return windows


def _window_nll(
    model: Any, windows: list[_Window], pad_id: int, device: torch.device
) -> list[tuple[float, int]]:
    """Summed NLL and scored-token count of each window (one right-padded forward pass)."""
    width = max(len(w.token_ids) for w in windows)
    input_ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(windows), width), dtype=torch.long)
    for row, window in enumerate(windows):
        input_ids[row, : len(window.token_ids)] = torch.tensor(window.token_ids)
        attention_mask[row, : len(window.token_ids)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    results = []
    for row, window in enumerate(windows):
        length = len(window.token_ids)
        targets = input_ids[row, window.score_from : length].to(device)
        logprobs = token_logprobs(logits[row, window.score_from - 1 : length - 1], targets)
        results.append((float(-logprobs.double().sum()), int(targets.numel())))
    return results


def evaluate_perplexity(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 512,
    stride: int | None = None,
    batch_size: int = 8,
    task: str = "perplexity",
    progress: bool = False,
    onednn: bool = True,
) -> EvalResult:
    """Token-weighted perplexity of ``model`` on ``texts`` (see the module docstring for windowing).

    ``metrics``: ``perplexity``, ``nll_per_token`` (nats) and ``tokens`` (number of scored tokens).
    """
    if max_length < 2:
        raise RetainFirstError(f"max_length must be at least 2, got {max_length}")
    if stride is not None and not 1 <= stride <= max_length:
        raise RetainFirstError(f"stride must be between 1 and max_length ({max_length}), got {stride}")
    if batch_size < 1:
        raise RetainFirstError(f"batch_size must be at least 1, got {batch_size}")
    max_length = cap_to_context(max_length, model, tokenizer)
    if stride is not None:
        stride = min(stride, max_length)
    documents = tokenize_documents(tokenizer, texts)
    windows = _windows(documents, max_length, stride)
    if not windows:
        raise RetainFirstError("no text has at least 2 tokens; perplexity needs texts to score")
    windows.sort(key=lambda w: -len(w.token_ids))  # less padding; the totals do not depend on order
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    batches = range(0, len(windows), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch")
    with evaluation_mode(model), onednn_linear(model, enabled=onednn) as linear_mode:
        for start in batches:
            for nll, count in _window_nll(model, windows[start : start + batch_size], pad_id, device):
                total_nll += nll
                total_tokens += count
        backend = linear_backend(linear_mode)
    mean_nll = total_nll / total_tokens
    return EvalResult(
        task=task,
        metrics={"perplexity": math.exp(mean_nll), "nll_per_token": mean_nll, "tokens": float(total_tokens)},
        n=len(documents),
        settings={
            "max_length": max_length,
            "stride": stride,
            "windows": len(windows),
            "batch_size": batch_size,
            "aggregation": "exp(total NLL / total tokens), token-weighted over documents",
            "linear_backend": backend,
        },
    )
