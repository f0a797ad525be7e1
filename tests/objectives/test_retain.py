"""Retain objectives (nll, kl, embed_diff) against brute-force computations."""

from __future__ import annotations

import pytest
import torch

from retainfirst.errors import RetainFirstError
from retainfirst.objectives import FrozenCopyReference, get_retain_objective


def test_nll_is_mean_token_nll_over_scored_tokens(tiny_model, byte_tokenizer, helpers):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS, answer_starts=[2, 0, 5])
    nll = get_retain_objective("nll")
    loss = nll.loss(tiny_model, batch, None)
    rows = helpers.sequences(tiny_model, batch)
    expected = -sum(total for total, _ in rows) / sum(count for _, count in rows)
    assert loss.dim() == 0 and loss.requires_grad
    assert loss.item() == pytest.approx(expected, abs=1e-4)
    assert nll.last_metrics == {"nll": pytest.approx(expected, abs=1e-4)}


def brute_kl(model, reference_model, batch) -> float:
    """KL(ref || model) per scored predicted token, averaged; one unpadded forward per sequence."""
    loss_mask = batch.get("loss_mask", batch["attention_mask"])
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][i].sum())
            ids = batch["input_ids"][i, :length][None]
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            logq = torch.log_softmax(reference_model(input_ids=ids).logits[0].double(), -1)
            for t in range(1, length):
                if loss_mask[i, t]:
                    total += float((logq[t - 1].exp() * (logq[t - 1] - logp[t - 1])).sum())
                    count += 1
    return total / count


def test_kl_matches_brute_force_and_is_zero_against_itself(
    tiny_model, byte_tokenizer, helpers, perturbed_copy
):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS, answer_starts=[3, 1, 2])
    kl = get_retain_objective("kl")
    assert kl.needs_reference
    itself = kl.loss(tiny_model, batch, FrozenCopyReference(tiny_model))
    assert itself.requires_grad and abs(itself.item()) < 1e-6
    other = perturbed_copy(tiny_model)
    loss = kl.loss(tiny_model, batch, FrozenCopyReference(other))
    expected = brute_kl(tiny_model, other, batch)
    assert expected > 1e-3
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert kl.last_metrics["kl"] == pytest.approx(expected, rel=1e-4)


def test_embed_diff_matches_brute_force_and_is_zero_against_itself(
    tiny_model, byte_tokenizer, helpers, perturbed_copy
):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS, answer_starts=[0, 2, 1])
    embed_diff = get_retain_objective("embed_diff", layer=2, coefficient=3.0)
    embed_diff.setup(tiny_model)
    assert embed_diff.needs_reference
    assert embed_diff.loss(tiny_model, batch, FrozenCopyReference(tiny_model)).item() == pytest.approx(
        0, abs=1e-10
    )
    other = perturbed_copy(tiny_model)
    loss = embed_diff.loss(tiny_model, batch, FrozenCopyReference(other))
    expected = helpers.masked_mse(
        helpers.hidden(tiny_model, batch, 2), helpers.hidden(other, batch, 2), batch
    )
    assert loss.requires_grad
    assert loss.item() == pytest.approx(3.0 * expected, rel=1e-5)


def test_embed_diff_layer_is_validated(tiny_model):
    with pytest.raises(RetainFirstError, match="layer 4 does not exist"):
        get_retain_objective("embed_diff", layer=4).setup(tiny_model)


@pytest.mark.parametrize(("name", "kwargs"), [("nll", {}), ("kl", {}), ("embed_diff", {"layer": 0})])
def test_batch_without_scored_tokens_raises(tiny_model, byte_tokenizer, helpers, name, kwargs):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS)
    batch["loss_mask"] = torch.zeros_like(batch["attention_mask"])
    objective = get_retain_objective(name, **kwargs)
    reference = FrozenCopyReference(tiny_model) if objective.needs_reference else None
    with pytest.raises(RetainFirstError, match="no scored tokens"):
        objective.loss(tiny_model, batch, reference)


@pytest.mark.parametrize("name", ["kl", "embed_diff"])
def test_reference_objectives_need_a_reference(tiny_model, byte_tokenizer, helpers, name):
    objective = get_retain_objective(name, **({"layer": 1} if name == "embed_diff" else {}))
    with pytest.raises(RetainFirstError, match="needs a reference"):
        objective.loss(tiny_model, helpers.batch(byte_tokenizer, helpers.TEXTS), None)
