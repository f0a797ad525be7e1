from __future__ import annotations

import math

import pytest
import torch

from retainfirst.errors import RetainFirstError
from retainfirst.evals.perplexity import _windows, evaluate_perplexity, token_logprobs

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi.",
    "Unlearning should forget the targeted facts and keep everything else intact.",
    "ab",
]


def reference_totals(model, tokenizer, texts):
    """Summed NLL and token count by one unpadded forward pass per document (HF's own loss)."""
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            loss = model(input_ids=ids, labels=ids).loss
            total_nll += loss.item() * (ids.shape[1] - 1)
            total_tokens += ids.shape[1] - 1
    return total_nll, total_tokens


def test_perplexity_is_token_weighted_exp_mean_nll(tiny_model, byte_tokenizer):
    total_nll, total_tokens = reference_totals(tiny_model, byte_tokenizer, TEXTS)
    result = evaluate_perplexity(tiny_model, byte_tokenizer, TEXTS, batch_size=3)
    assert result.metrics["tokens"] == total_tokens
    assert result.metrics["nll_per_token"] == pytest.approx(total_nll / total_tokens, rel=1e-5)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)
    assert result.n == len(TEXTS)
    # a mean of per-document perplexities would differ: the short documents are not overweighted
    assert result.metrics["perplexity"] > 1.0


def test_padding_and_batch_size_do_not_change_the_result(tiny_model, byte_tokenizer):
    one = evaluate_perplexity(tiny_model, byte_tokenizer, TEXTS, batch_size=1)
    four = evaluate_perplexity(tiny_model, byte_tokenizer, TEXTS, batch_size=4)
    assert four.metrics["perplexity"] == pytest.approx(one.metrics["perplexity"], rel=1e-5)


def test_windows_score_every_token_once():
    document = list(range(10))
    for stride in (None, 1, 2, 3):
        windows = _windows([document], max_length=4, stride=stride)
        scored = [w.token_ids[i] for w in windows for i in range(w.score_from, len(w.token_ids))]
        assert scored == list(range(1, 10)), stride
        assert all(len(w.token_ids) <= 4 for w in windows)
    non_overlapping = _windows([document], max_length=4, stride=4)
    assert [w.token_ids[w.score_from] for w in non_overlapping] == [1, 5, 9]


def test_sliding_window_matches_a_plain_loop(tiny_model, byte_tokenizer):
    text = TEXTS[2]
    ids = byte_tokenizer(text)["input_ids"]
    max_length, stride = 16, 5
    total_nll, total_tokens, scored_until = 0.0, 0, 1
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + max_length, len(ids))
            window = torch.tensor([ids[begin:end]])
            labels = window.clone()
            first = max(scored_until, begin + 1) - begin
            labels[0, :first] = -100
            count = int((labels[0, 1:] != -100).sum())
            if count:
                total_nll += tiny_model(input_ids=window, labels=labels).loss.item() * count
                total_tokens += count
            scored_until = end
            if end == len(ids):
                break
    result = evaluate_perplexity(tiny_model, byte_tokenizer, [text], max_length=max_length, stride=stride)
    assert result.metrics["tokens"] == total_tokens == len(ids) - 1
    assert result.metrics["nll_per_token"] == pytest.approx(total_nll / total_tokens, rel=1e-5)


def test_long_max_length_makes_stride_irrelevant(tiny_model, byte_tokenizer):
    full = evaluate_perplexity(tiny_model, byte_tokenizer, TEXTS[:1], max_length=512)
    strided = evaluate_perplexity(tiny_model, byte_tokenizer, TEXTS[:1], max_length=512, stride=7)
    assert strided.metrics["perplexity"] == pytest.approx(full.metrics["perplexity"], rel=1e-6)


def test_training_mode_and_grads_untouched(tiny_model, byte_tokenizer):
    tiny_model.train()
    evaluate_perplexity(tiny_model, byte_tokenizer, TEXTS[:2])
    assert tiny_model.training
    assert all(p.grad is None for p in tiny_model.parameters())
    tiny_model.eval()
    evaluate_perplexity(tiny_model, byte_tokenizer, TEXTS[:2])
    assert not tiny_model.training


def test_token_logprobs_chunks_agree_with_log_softmax(monkeypatch):
    import retainfirst.evals.perplexity as perplexity

    monkeypatch.setattr(perplexity, "LOGPROB_CHUNK", 3)
    logits = torch.randn(10, 7, dtype=torch.float64).to(torch.bfloat16)
    targets = torch.randint(0, 7, (10,))
    expected = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    got = token_logprobs(logits, targets)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-6)


def test_bad_inputs_raise(tiny_model, byte_tokenizer):
    with pytest.raises(RetainFirstError, match="single string"):
        evaluate_perplexity(tiny_model, byte_tokenizer, "one text")
    with pytest.raises(RetainFirstError, match="stride"):
        evaluate_perplexity(tiny_model, byte_tokenizer, TEXTS, max_length=8, stride=9)
    with pytest.raises(RetainFirstError, match="at least 2 tokens"):
        evaluate_perplexity(tiny_model, byte_tokenizer, ["", "a"])


def test_max_length_is_capped_at_the_model_context_and_warned_once(byte_tokenizer, caplog):
    """Issue 14: ppl_max_length far above the context made 23 GB windows; it is capped at the context."""
    from retainfirst.evals import perplexity
    from retainfirst.models import build_tiny_llama

    model = build_tiny_llama(
        len(byte_tokenizer), hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=16
    )
    texts = ["A sentence long enough to need several windows of sixteen tokens each, surely."]
    perplexity._warned_caps.clear()
    with caplog.at_level("WARNING", logger="retainfirst.evals.perplexity"):
        capped = evaluate_perplexity(model, byte_tokenizer, texts, max_length=100_000)
        again = evaluate_perplexity(model, byte_tokenizer, texts, max_length=100_000)
    exact = evaluate_perplexity(model, byte_tokenizer, texts, max_length=16)
    assert capped.settings["max_length"] == 16 and capped.settings["windows"] == exact.settings["windows"] > 1
    assert capped.metrics == exact.metrics == again.metrics
    warnings = [r.getMessage() for r in caplog.records if "context" in r.getMessage()]
    assert warnings == [
        "perplexity: max_length 100000 is longer than the model's context of 16 tokens; using 16"
    ]


def test_model_context_ignores_the_tokenizer_unknown_marker(byte_tokenizer):
    from types import SimpleNamespace

    from retainfirst.evals.perplexity import model_context_length

    no_limit = SimpleNamespace(config=SimpleNamespace())
    assert model_context_length(no_limit, SimpleNamespace(model_max_length=int(1e30))) is None
    assert model_context_length(no_limit, byte_tokenizer) == 512
    assert model_context_length(SimpleNamespace(config=SimpleNamespace(n_positions=64)), byte_tokenizer) == 64
