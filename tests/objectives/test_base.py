"""objectives/base.py: shifted log-probs, masks (never the pad id), float32 maths for bf16, batch checks."""

from __future__ import annotations

import pytest
import torch

from retainfirst.errors import RetainFirstError
from retainfirst.objectives import base, get_forget_objective, get_retain_objective
from retainfirst.objectives.base import scored_mask, sequence_logprobs, token_nll


def loop_logprobs(logits, input_ids, loss_mask):
    """Token-by-token reference: logits[t-1] predicts input_ids[t], scored iff loss_mask[t]."""
    sums, counts = [], []
    for i in range(input_ids.shape[0]):
        total, count = 0.0, 0
        for t in range(1, input_ids.shape[1]):
            if loss_mask[i, t]:
                total += float(torch.log_softmax(logits[i, t - 1].double(), dim=-1)[input_ids[i, t]])
                count += 1
        sums.append(total)
        counts.append(count)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts)


def random_case(seed=0, batch=3, length=7, vocab=11):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, length, vocab, generator=generator)
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    loss_mask = (torch.rand(batch, length, generator=generator) > 0.4).long()
    loss_mask[2] = 0  # a sequence with nothing to score
    return logits, input_ids, loss_mask


def test_sequence_logprobs_matches_token_loop():
    logits, input_ids, loss_mask = random_case()
    sums, counts = sequence_logprobs(logits, input_ids, loss_mask)
    expected_sums, expected_counts = loop_logprobs(logits, input_ids, loss_mask)
    assert sums.dtype == torch.float32
    assert torch.equal(counts, expected_counts)
    assert torch.allclose(sums.double(), expected_sums, atol=1e-5)
    assert sums[2] == 0 and counts[2] == 0


def test_first_token_is_never_scored_and_shift_uses_predicted_token_mask():
    logits, input_ids, _ = random_case(seed=1)
    only_first = torch.zeros_like(input_ids)
    only_first[:, 0] = 1
    sums, counts = sequence_logprobs(logits, input_ids, only_first)
    assert counts.sum() == 0 and sums.abs().sum() == 0
    only_second = torch.zeros_like(input_ids)
    only_second[:, 1] = 1
    sums, counts = sequence_logprobs(logits, input_ids, only_second)
    expected = torch.log_softmax(logits[:, 0], dim=-1).gather(-1, input_ids[:, 1:2]).squeeze(-1)
    assert torch.equal(counts, torch.ones(3, dtype=torch.long))
    assert torch.allclose(sums, expected, atol=1e-6)


def test_bf16_logits_are_scored_in_float32_and_chunking_changes_nothing(monkeypatch):
    logits, input_ids, loss_mask = random_case(seed=2, vocab=50)
    low = logits.bfloat16()
    sums, _ = sequence_logprobs(low, input_ids, loss_mask)
    expected, _ = loop_logprobs(low.float(), input_ids, loss_mask)  # exact maths on the bf16 values
    assert sums.dtype == torch.float32
    assert torch.allclose(sums.double(), expected, atol=1e-4)
    monkeypatch.setattr(base, "LOGSUMEXP_CHUNK_ROWS", 2)
    chunked, _ = sequence_logprobs(low, input_ids, loss_mask)
    assert torch.allclose(chunked, sums, atol=1e-6)


def test_sequence_logprobs_gradient_matches_log_softmax():
    logits, input_ids, loss_mask = random_case(seed=3)
    mine = logits.clone().requires_grad_(True)
    sequence_logprobs(mine, input_ids, loss_mask)[0].sum().backward()
    plain = logits.clone().requires_grad_(True)
    chosen = torch.log_softmax(plain[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    (chosen * loss_mask[:, 1:]).sum().backward()
    assert torch.allclose(mine.grad, plain.grad, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [2, 1024])
def test_bf16_gradient_matches_float32_log_softmax(monkeypatch, chunk_rows):
    monkeypatch.setattr(base, "LOGSUMEXP_CHUNK_ROWS", chunk_rows)
    logits, input_ids, loss_mask = random_case(seed=5, vocab=40)
    mine = logits.bfloat16().requires_grad_(True)
    sequence_logprobs(mine, input_ids, loss_mask)[0].sum().backward()
    plain = logits.bfloat16().float().requires_grad_(True)
    chosen = torch.log_softmax(plain[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    (chosen * loss_mask[:, 1:]).sum().backward()
    assert mine.grad.dtype == torch.bfloat16
    assert torch.allclose(mine.grad.float(), plain.grad, atol=1e-2)
    assert mine.grad.abs().sum() > 0


def test_logsumexp_function_passes_gradcheck_in_float64(monkeypatch):
    monkeypatch.setattr(base, "LOGSUMEXP_CHUNK_ROWS", 3)
    logits, input_ids, loss_mask = random_case(seed=6, vocab=6)
    logits = logits.double().requires_grad_(True)
    assert sequence_logprobs(logits, input_ids, loss_mask)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: sequence_logprobs(x, input_ids, loss_mask)[0], (logits,))


def test_token_nll_is_mean_over_scored_tokens_and_rejects_empty():
    logits, input_ids, loss_mask = random_case(seed=4)
    sums, counts = loop_logprobs(logits, input_ids, loss_mask)
    assert token_nll(logits, input_ids, loss_mask).item() == pytest.approx(
        float(-sums.sum() / counts.sum()), abs=1e-5
    )
    with pytest.raises(RetainFirstError, match="no scored tokens"):
        token_nll(logits, input_ids, torch.zeros_like(loss_mask))


def test_scored_mask_combines_attention_and_loss_mask_and_ignores_pad_id():
    input_ids = torch.tensor([[5, 0, 7, 0, 0]])  # 0 = pad = eos, the first 0 is real text
    attention_mask = torch.tensor([[1, 1, 1, 0, 0]])
    assert scored_mask({"input_ids": input_ids, "attention_mask": attention_mask}).tolist() == [
        [True, True, True, False, False]
    ]
    loss_mask = torch.tensor([[0, 1, 1, 1, 1]])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    assert scored_mask(batch).tolist() == [[False, True, True, False, False]]


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, "attention_mask"),
        (
            {"input_ids": torch.zeros(3, dtype=torch.long), "attention_mask": torch.ones(3)},
            r"\[batch, tokens\]",
        ),
        ({"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 4)}, "shape"),
        (
            {
                "input_ids": torch.zeros(2, 3, dtype=torch.long),
                "attention_mask": torch.ones(2, 3),
                "loss_mask": torch.ones(2, 2),
            },
            "loss_mask",
        ),
    ],
)
def test_bad_batches_raise_clear_errors(batch, message):
    with pytest.raises(RetainFirstError, match=message):
        scored_mask(batch)


def test_numeric_options_reject_bools_nan_and_out_of_range():
    # option validation is each objective's pydantic Options model (check_number is gone)
    assert get_forget_objective("npo", beta=2).beta == 2.0
    for bad in (True, float("nan"), "1", float("inf")):
        with pytest.raises(RetainFirstError, match="beta"):
            get_forget_objective("npo", beta=bad)
    with pytest.raises(RetainFirstError, match="beta=0 must be > 0"):
        get_forget_objective("npo", beta=0)
    with pytest.raises(RetainFirstError, match="coefficient=-1 must be >= 0"):
        get_retain_objective("embed_diff", coefficient=-1)
