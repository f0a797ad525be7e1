"""oneDNN linears for CPU inference: same products, only where eligible, nothing left behind."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from retainfirst.data import MCQuestion
from retainfirst.evals import cpu_linear
from retainfirst.evals.cpu_linear import onednn_available, onednn_linear
from retainfirst.evals.mcq import evaluate_mcq
from retainfirst.evals.perplexity import evaluate_perplexity
from retainfirst.models import build_tiny_llama

# The x86 builds CI and our users' GPU hosts run ship oneDNN with this op; elsewhere the context
# may be off (the fallback tests below still run).
needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available() or platform.machine().lower() not in ("x86_64", "amd64"),
    reason="oneDNN linear is checked on x86 builds",
)


@pytest.fixture
def model(byte_tokenizer):
    return build_tiny_llama(len(byte_tokenizer), hidden_size=64, num_layers=2, num_heads=4).eval()


QUESTIONS = [
    MCQuestion("What is 2+2?", ["3", "4", "5", "22"], 1, "elementary_mathematics"),
    MCQuestion("Pick the vowel.", ["b", "e", "k", "z"], 1, "english_grammar"),
    MCQuestion("H2O is?", ["salt", "iron", "water", "gold"], 2, "high_school_chemistry"),
    MCQuestion("Ten minus one?", ["8", "1", "11", "9"], 3, "elementary_mathematics"),
]


def linear_count(model) -> int:
    return sum(isinstance(m, torch.nn.Linear) for m in model.modules())


@needs_onednn
def test_probe_passes_on_this_build():
    assert onednn_available()


@needs_onednn
def test_model_logits_match_and_every_linear_goes_through_onednn(model):
    ids = torch.randint(0, 200, (3, 17))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        with onednn_linear(model) as mode:
            got = model(input_ids=ids).logits
    assert mode is not None
    assert mode.calls == linear_count(model)  # one forward: each Linear once
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_keyword_arguments_bias_and_non_contiguous_inputs():
    x = torch.randn(4, 6, 10)[:, ::2]  # non-contiguous
    weight, bias = torch.randn(7, 10), torch.randn(7)
    with torch.no_grad(), onednn_linear() as mode:
        got = F.linear(input=x, weight=weight, bias=bias)
        got_positional = F.linear(x, weight)
    assert mode.calls == 2
    assert torch.allclose(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    assert torch.allclose(got_positional, x @ weight.T, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_autograd_dtypes_and_vectors_keep_the_default_path(model):
    ids = torch.randint(0, 200, (2, 9))
    with onednn_linear(model) as mode:
        loss = model(input_ids=ids, labels=ids).loss  # grad enabled, weights require grad
        loss.backward()
        with torch.no_grad():
            F.linear(torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64))
            F.linear(torch.randn(3, 5, dtype=torch.bfloat16), torch.randn(4, 5, dtype=torch.bfloat16))
            F.linear(torch.randn(5), torch.randn(4, 5))  # a vector input
    assert mode.calls == 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@needs_onednn
def test_nothing_is_intercepted_after_the_block(model):
    with torch.no_grad(), onednn_linear(model) as mode:
        model(input_ids=torch.randint(0, 200, (1, 5)))
    calls = mode.calls
    with torch.no_grad():
        model(input_ids=torch.randint(0, 200, (1, 5)))
    assert calls == linear_count(model) and mode.calls == calls


def test_off_when_disabled_or_when_the_probe_fails(model, monkeypatch):
    with onednn_linear(model, enabled=False) as mode:
        assert mode is None
    monkeypatch.setattr(cpu_linear, "_probe_result", None)

    def missing_op():
        raise AttributeError("no mkldnn::_linear_pointwise in this build")

    monkeypatch.setattr(cpu_linear, "_op", missing_op)
    assert not onednn_available()
    with onednn_linear(model) as mode:
        assert mode is None


def test_probe_rejects_an_op_that_computes_something_else(monkeypatch):
    monkeypatch.setattr(cpu_linear, "_probe_result", None)
    monkeypatch.setattr(cpu_linear, "_op", lambda: lambda x, w, b, *rest: F.linear(x, w, b) * (1 + 1e-3))
    assert not onednn_available()


@needs_onednn
def test_evaluate_mcq_reports_the_backend_and_scores_agree(byte_tokenizer, model):
    fast = evaluate_mcq(model, byte_tokenizer, QUESTIONS, batch_size=3)
    slow = evaluate_mcq(model, byte_tokenizer, QUESTIONS, batch_size=3, onednn=False)
    assert fast.settings["linear_backend"] == "onednn"
    assert slow.settings["linear_backend"] == "default"
    for a, b in zip(fast.samples, slow.samples, strict=True):
        assert a["pred"] == b["pred"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)


@needs_onednn
def test_evaluate_perplexity_reports_the_backend_and_agrees(byte_tokenizer, model):
    texts = ["The quick brown fox jumps over the lazy dog.", "Forget this, keep that.", "ab"]
    fast = evaluate_perplexity(model, byte_tokenizer, texts, max_length=16, batch_size=2)
    slow = evaluate_perplexity(model, byte_tokenizer, texts, max_length=16, batch_size=2, onednn=False)
    assert fast.settings["linear_backend"] == "onednn"
    assert slow.settings["linear_backend"] == "default"
    assert fast.metrics["tokens"] == slow.metrics["tokens"]
    assert fast.metrics["nll_per_token"] == pytest.approx(slow.metrics["nll_per_token"], rel=1e-5)
