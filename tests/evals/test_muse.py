"""MUSE metrics against values computed by hand."""

from __future__ import annotations

import pytest

from retainfirst.errors import RetainFirstError
from retainfirst.evals import muse


def test_rouge_l_is_f1_and_recall_without_stemming():
    # LCS("the cat sat", "the cat sat on the mat") = 3 words: P = 1, R = 1/2, F1 = 2/3
    assert muse.rouge_l(["the cat sat"], ["the cat sat on the mat"]) == [pytest.approx((2 / 3, 0.5))]
    # no stemming: "apples" does not match "apple"
    assert muse.rouge_l(["apples"], ["apple"]) == [(0.0, 0.0)]


def test_knowmem_prompt_and_answer_cut():
    prompt = muse.knowmem_prompt("Who?", [("Q1", "A1"), ("Q2", "A2")])
    assert prompt == "Question: Q1\nAnswer: A1\n\nQuestion: Q2\nAnswer: A2\n\nQuestion: Who?\nAnswer: "
    assert muse.knowmem_prompt("Who?", []) == "Question: Who?\nAnswer: "
    assert muse.cut_answer("Ann\n\nQuestion: next") == "Ann"
    assert muse.cut_answer("Ann Lee\nQuestion: x") == "Ann Lee"
    assert muse.cut_answer("Ann Question: x") == "Ann "


def test_privleak_auc_and_relative_leak_by_hand():
    forget, holdout = [-1.0, -2.0], [-3.0, -0.5]
    # pairs (holdout > forget): -0.5 > -1, -0.5 > -2; -3 > neither: 2 of 4
    assert muse.privleak_auc(forget, holdout) == 0.5
    assert muse.privleak_auc([-1.0], [-1.0]) == 0.5  # a tie counts one half
    assert muse.privleak_auc([-0.1, -0.2], [-5.0, -6.0]) == 0.0  # forget texts look like members
    assert muse.privleak(0.5, 0.4) == pytest.approx(25.0)
    assert muse.privleak(0.0, 0.4772) == pytest.approx(-100.0)
    with pytest.raises(RetainFirstError):
        muse.privleak(0.5, 0.0)


def test_select_checkpoint_takes_the_first_at_or_below_the_retrained_model():
    assert muse.select_checkpoint([0.6, 0.45, 0.3, 0.1], 0.45) == 1
    assert muse.select_checkpoint([0.2, 0.1], 0.3) == 0
    assert muse.select_checkpoint([0.6, 0.5], 0.3) is None
    assert muse.select_checkpoint([], 0.3) is None


def test_verbmem_truncates_the_reference_and_scores_f1(monkeypatch, byte_tokenizer):
    seen = {}

    def generate(model, tokenizer, prompts, **kwargs):
        seen.update(kwargs)
        return ["a b c", "x"]

    monkeypatch.setattr(muse, "generate_greedy", generate)
    # byte tokenizer: one token per character, so 5 tokens keep "a b c"
    out = muse.verbmem(None, byte_tokenizer, [("p1", "a b c d e f"), ("p2", "y z")], max_new_tokens=5)
    assert seen["max_new_tokens"] == 5 and seen["stop_at_newline"] is False
    assert out["rougeL_f1"] == pytest.approx((1.0 + 0.0) / 2)
    assert out["samples"][0]["reference"] == "a b c"


def test_knowmem_cuts_generations_before_scoring(monkeypatch):
    prompts_seen = []

    def generate(model, tokenizer, prompts, **kwargs):
        prompts_seen.extend(prompts)
        return ["Ann Lee\n\nQuestion: more", "Rome city"]

    monkeypatch.setattr(muse, "generate_greedy", generate)
    out = muse.knowmem(None, None, [("Who?", "Ann Lee"), ("Where?", "Rome")], [("Q", "A")])
    assert prompts_seen[0] == "Question: Q\nAnswer: A\n\nQuestion: Who?\nAnswer: "
    # "Rome city" vs "Rome": P = 1/2, R = 1, F1 = 2/3
    assert out["rougeL_f1"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert out["rougeL_recall"] == pytest.approx(1.0)
