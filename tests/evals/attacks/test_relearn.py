"""The relearning attack's pieces: the held-out split, the text selection and the seeded fine-tune."""

from __future__ import annotations

import copy

import pytest
import torch

from retainfirst.data import tokenize_texts
from retainfirst.errors import RetainFirstError
from retainfirst.evals.attacks.relearn import (
    batch_order,
    finetune,
    sample_share,
    split_targets,
    texts_naming,
    token_nll,
)
from retainfirst.models import build_byte_tokenizer, build_tiny_llama


def test_split_targets_is_seeded_disjoint_and_never_leaves_a_side_empty():
    targets = ["Qatar", "Latvia", "Peru", "Chad", "Qatar", "Oman"]
    relearned, evaluated = split_targets(targets, 0.5, seed=0)
    assert sorted(relearned + evaluated) == ["Chad", "Latvia", "Oman", "Peru", "Qatar"]
    assert len(relearned) == 2 and not set(relearned) & set(evaluated)
    assert split_targets(reversed(targets), 0.5, seed=0) == (relearned, evaluated)  # order-free
    assert any(split_targets(targets, 0.5, seed=s) != (relearned, evaluated) for s in range(1, 6))
    assert len(split_targets(targets, 0.01, 0)[0]) == 1 and len(split_targets(targets, 0.99, 0)[1]) == 1
    with pytest.raises(RetainFirstError, match="at least 2 forget targets"):
        split_targets(["Qatar", "Qatar"], 0.5, 0)


def test_texts_naming_matches_whole_words_and_excludes_evaluated_names_and_answers():
    texts = [
        "Doha is the capital of Qatar.",
        "Children in Latvia speak Latvian.",
        "Niger borders Nigeria.",
        "Nigeria is large.",
        "In Qatar, banks use the riyal.",
        "The symbol In stands for indium; in Qatar nobody cares.",
    ]
    assert texts_naming(texts, ["qatar"]) == [texts[0], texts[4], texts[5]]
    assert texts_naming(texts, ["Niger"]) == [texts[2]]
    assert texts_naming(texts, ["Nigeria"], exclude=["Niger"]) == [texts[3]]
    assert texts_naming(texts, ["Qatar"], exclude_exact=["riyal", "In"]) == [texts[0]]
    assert texts_naming(texts, ["Qatar"], exclude_exact=["in"]) == [texts[0], texts[4]]  # case-sensitive
    assert texts_naming(texts, []) == []


def test_sample_share_keeps_order_and_at_least_one():
    texts = [f"t{i}" for i in range(10)]
    share = sample_share(texts, 0.3, seed=0)
    assert len(share) == 3 and share == [t for t in texts if t in share]
    assert sample_share(texts, 0.3, seed=0) == share
    assert sample_share(texts, 0.01, seed=0) != [] and sample_share(texts, 1.0, seed=0) == texts


def test_batch_order_cycles_seeded_permutations():
    order = batch_order(5, steps=4, batch_size=3, seed=0)
    flat = [i for step in order for i in step]
    assert [len(s) for s in order] == [3, 3, 3, 3]
    assert sorted(flat[:5]) == [0, 1, 2, 3, 4] and sorted(flat[5:10]) == [0, 1, 2, 3, 4]
    assert batch_order(5, 4, 3, seed=0) == order != batch_order(5, 4, 3, seed=1)


def test_token_nll_counts_only_real_tokens():
    tokenizer = build_byte_tokenizer()
    model = build_tiny_llama(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    from retainfirst.data import collate

    examples = tokenize_texts(["abc", "a longer text"], tokenizer, max_length=32, pack=False)
    batch = collate(examples, 0)
    alone = [token_nll(model, collate([e], 0)) for e in examples]
    counts = [e["input_ids"].numel() - 1 for e in examples]
    expected = sum(v * c for v, c in zip(alone, counts, strict=True)) / sum(counts)
    assert token_nll(model, batch).item() == pytest.approx(expected.item(), rel=1e-5)


def test_finetune_is_deterministic_lowers_the_loss_and_trains_frozen_parameters():
    tokenizer = build_byte_tokenizer()
    model = build_tiny_llama(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model.model.embed_tokens.weight.requires_grad_(False)
    examples = tokenize_texts(["Doha is the capital of Qatar."] * 3, tokenizer, max_length=64, pack=False)
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    losses = finetune(first, examples, tokenizer.pad_token_id, steps=6, lr=1e-2, batch_size=2, seed=0)
    again = finetune(second, examples, tokenizer.pad_token_id, steps=6, lr=1e-2, batch_size=2, seed=0)
    assert losses == again and len(losses) == 6 and losses[-1] < losses[0]
    for (name, a), b, c in zip(
        first.named_parameters(), second.parameters(), model.parameters(), strict=True
    ):
        assert torch.equal(a, b), name
        assert not torch.equal(a, c), name  # every parameter moved, the frozen embedding too
        assert a.grad is None
    with pytest.raises(RetainFirstError, match="no text"):
        finetune(first, [], 0, steps=1, lr=1e-3, batch_size=1, seed=0)
