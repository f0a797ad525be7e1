from __future__ import annotations

import itertools
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retainfirst.errors import RetainFirstError
from retainfirst.evals.mia import evaluate_mia, lowest_fraction_mean, mann_whitney_auc, score_texts

FORGET = [
    "Ada Lovelace wrote the first published algorithm.",
    "The Analytical Engine was designed by Charles Babbage.",
    "Lovelace was the daughter of Lord Byron.",
]
RETAIN = [
    "Water boils at one hundred degrees Celsius at sea level.",
    "The Pacific is the largest ocean on Earth.",
    "Bees communicate by dancing.",
]


def pairwise_auc(positive, negative):
    wins = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positive, negative)]
    return sum(wins) / len(wins)


def test_auc_hand_computed_with_ties():
    # pairs: 0.9 beats both; each 0.5 ties 0.5 (1/2) and beats 0.1 -> (2 + 1.5 + 1.5) / 6
    assert mann_whitney_auc([0.9, 0.5, 0.5], [0.5, 0.1]) == pytest.approx(5 / 6)
    assert mann_whitney_auc([3, 4], [1, 2]) == 1.0
    assert mann_whitney_auc([1, 2], [3, 4]) == 0.0
    assert mann_whitney_auc([7, 7, 7], [7, 7]) == 0.5


def test_auc_matches_pairwise_counting_on_random_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos = rng.integers(0, 5, size=rng.integers(1, 9)).tolist()
        neg = rng.integers(0, 5, size=rng.integers(1, 9)).tolist()
        assert mann_whitney_auc(pos, neg) == pytest.approx(pairwise_auc(pos, neg))


def test_auc_rejects_empty_and_nan():
    with pytest.raises(RetainFirstError, match="at least one"):
        mann_whitney_auc([], [1.0])
    with pytest.raises(RetainFirstError, match="non-finite"):
        mann_whitney_auc([float("nan")], [1.0])


def test_lowest_fraction_mean_floors_and_keeps_one():
    values = torch.tensor([5.0, -1.0, 3.0, -4.0, 0.0])
    assert lowest_fraction_mean(values, 0.4) == pytest.approx(-2.5)  # floor(2.0) = 2 lowest
    assert lowest_fraction_mean(values, 0.1) == pytest.approx(-4.0)  # floor(0.5) = 0 -> 1
    assert lowest_fraction_mean(values, 1.0) == pytest.approx(0.6)


def reference_scores(model, tokenizer, text, k):
    """RWKU-style per-text loop: one unpadded forward, full-vocabulary softmax."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    log_probs = F.log_softmax(out.logits[0, :-1].double(), dim=-1)
    probs = log_probs.exp()
    token_lp = log_probs.gather(-1, ids[0, 1:, None]).squeeze(-1)
    mu = (probs * log_probs).sum(-1)
    sigma = ((probs * log_probs.square()).sum(-1) - mu.square()).sqrt()
    zscore = (token_lp - mu) / sigma
    count = max(1, int(len(token_lp) * k))
    ll = -out.loss.item()
    return {
        "loss": ll,
        "zlib": ll / len(zlib.compress(text.encode("utf-8"))),
        "mink": token_lp.sort().values[:count].mean().item(),
        "minkpp": zscore.sort().values[:count].mean().item(),
    }


def test_scores_match_a_per_text_reference_and_ignore_padding(tiny_model, byte_tokenizer):
    texts = FORGET + RETAIN
    batched = score_texts(tiny_model, byte_tokenizer, texts, batch_size=4, k=0.2)
    single = score_texts(tiny_model, byte_tokenizer, texts, batch_size=1, k=0.2)
    for text, got, alone in zip(texts, batched, single, strict=True):
        expected = reference_scores(tiny_model, byte_tokenizer, text, 0.2)
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
            assert alone[name] == pytest.approx(got[name], rel=1e-4, abs=1e-5), name
        assert got["zlib_bytes"] == len(zlib.compress(text.encode("utf-8")))


def test_truncation_scores_the_first_max_length_tokens(tiny_model, byte_tokenizer):
    text = FORGET[0]
    short = text[:12]  # byte tokenizer: 12 tokens
    truncated = score_texts(tiny_model, byte_tokenizer, [text], max_length=12)[0]
    expected = reference_scores(tiny_model, byte_tokenizer, short, 0.2)
    assert truncated["tokens"] == 11
    assert truncated["loss"] == pytest.approx(expected["loss"], rel=1e-4)
    assert truncated["zlib"] == pytest.approx(expected["zlib"], rel=1e-4)


class BigramLM(torch.nn.Module):
    """Next-token logits depend on the current token only: log bigram frequencies of some texts."""

    def __init__(self, tokenizer, texts, vocab_size):
        super().__init__()
        counts = torch.ones(vocab_size, vocab_size)
        for text in texts:
            ids = tokenizer(text)["input_ids"]
            for current, following in itertools.pairwise(ids):
                counts[current, following] += 50.0
        self.table = torch.nn.Parameter(counts.log())

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_members_with_lower_loss_give_auc_near_one(byte_tokenizer):
    model = BigramLM(byte_tokenizer, FORGET, len(byte_tokenizer))
    model.train()
    result = evaluate_mia(model, byte_tokenizer, FORGET, RETAIN, batch_size=2)
    assert model.training
    for score in ("loss", "zlib", "mink", "minkpp"):
        assert result.metrics[f"auc_{score}"] == 1.0, score
        assert result.breakdown["forget"][score] > result.breakdown["retain"][score]
    swapped = evaluate_mia(model, byte_tokenizer, RETAIN, FORGET)
    assert swapped.metrics["auc_loss"] == 0.0
    assert result.metrics["forget_mean_loss"] == result.breakdown["forget"]["loss"]
    assert result.n == 6 and result.settings["k"] == 0.2
    assert len(result.samples) == 6


def test_bad_inputs_raise(tiny_model, byte_tokenizer):
    with pytest.raises(RetainFirstError, match=r"forget_texts\[1\]"):
        evaluate_mia(tiny_model, byte_tokenizer, ["fine text", "a"], RETAIN)
    with pytest.raises(RetainFirstError, match="k must be"):
        evaluate_mia(tiny_model, byte_tokenizer, FORGET, RETAIN, k=0.0)
    with pytest.raises(RetainFirstError, match="at least one"):
        evaluate_mia(tiny_model, byte_tokenizer, FORGET, [])
