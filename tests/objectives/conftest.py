"""Batches and plain brute-force references (per-sequence loops, no padding) for the objective tests."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

# A pad/eos token (id 0) *inside* the first text: it must be scored, while padding must not.
TEXTS = ["the cat sat<|endoftext|>on it", "dogs bark", "a b c d e f g h"]


def right_padded_batch(tokenizer, texts: list[str], answer_starts: list[int] | None = None) -> dict:
    """Right-padded batch; ``answer_starts[i]`` = first scored token of text i (prompt before it)."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    width = max(len(row) for row in ids) + 2  # always some padding
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)  # pad id 0 == eos id
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if answer_starts is not None:
        loss_mask = attention_mask.clone()
        for i, start in enumerate(answer_starts):
            loss_mask[i, :start] = 0
        batch["loss_mask"] = loss_mask
    return batch


def brute_sequences(model, batch) -> list[tuple[float, int]]:
    """(summed log-prob of scored tokens, count) per sequence: one unpadded forward per sequence and a
    plain loop over positions, in float64."""
    results = []
    loss_mask = batch.get("loss_mask", batch["attention_mask"])
    with torch.no_grad():
        for i in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][i].sum())
            ids = batch["input_ids"][i, :length]
            logits = model(input_ids=ids[None]).logits[0].double()
            total, count = 0.0, 0
            for t in range(1, length):
                if loss_mask[i, t]:
                    total += float(torch.log_softmax(logits[t - 1], dim=-1)[ids[t]])
                    count += 1
            results.append((total, count))
    return results


def brute_hidden(model, batch, layer: int) -> list[torch.Tensor]:
    """Output of decoder layer ``layer`` for each sequence, unpadded, from output_hidden_states."""
    rows = []
    with torch.no_grad():
        for i in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][i].sum())
            out = model(input_ids=batch["input_ids"][i, :length][None], output_hidden_states=True)
            rows.append(out.hidden_states[layer + 1][0].double())
    return rows


def brute_masked_mse(hidden_rows, target_rows, batch) -> float:
    """Mean over scored tokens and dims of (h - target)^2, token by token."""
    loss_mask = batch.get("loss_mask", batch["attention_mask"])
    total, count = 0.0, 0
    for i, hidden in enumerate(hidden_rows):
        for t in range(hidden.shape[0]):
            if loss_mask[i, t]:
                target = target_rows[i][t] if isinstance(target_rows, list) else target_rows
                total += float(((hidden[t] - target.double()) ** 2).mean())
                count += 1
    return total / count


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


@pytest.fixture
def helpers():
    return SimpleNamespace(
        TEXTS=TEXTS,
        batch=right_padded_batch,
        sequences=brute_sequences,
        hidden=brute_hidden,
        masked_mse=brute_masked_mse,
        log_sigmoid=log_sigmoid,
    )


@pytest.fixture
def perturbed_copy():
    """A copy of a model with every weight nudged, to act as a reference different from the model."""

    def make(model, scale: float = 0.05, seed: int = 1):
        import copy

        other = copy.deepcopy(model)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in other.parameters():
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
        return other

    return make
