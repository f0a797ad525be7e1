"""TOFU metrics against values computed by hand (losses fixed by monkeypatching the model scoring)."""

from __future__ import annotations

import math

import pytest
import torch

from retainfirst.data.tofu import TofuData, TofuItem
from retainfirst.errors import RetainFirstError
from retainfirst.evals import tofu
from retainfirst.evals.results import EvalResult


def hmean(values):
    return len(values) / sum(1 / v for v in values)


def test_truth_ratio_and_forget_quality_statistic_by_hand():
    # base loss 1.0, perturbed 2.0 and 0.5: R = (e^-2 + e^-0.5)/2 / e^-1
    assert tofu.truth_ratio(1.0, [2.0, 0.5]) == pytest.approx(
        (math.exp(-2) + math.exp(-0.5)) / 2 / math.exp(-1)
    )
    # TOFU's forget-quality value uses the mean of the losses (a geometric mean of probabilities)
    assert tofu.forget_quality_statistic(1.0, [2.0, 0.5]) == pytest.approx(math.exp(1.25 - 1.0))
    with pytest.raises(RetainFirstError):
        tofu.truth_ratio(1.0, [])


def test_probability_is_normalised_over_options_only_for_real_and_world():
    losses, perturbed = [0.5, 1.0], [[1.0, 2.0], [0.1]]
    plain = (math.exp(-0.5) + math.exp(-1.0)) / 2
    assert tofu.probability_statistic("forget", losses, perturbed) == pytest.approx(plain)
    assert tofu.probability_statistic("retain", losses, perturbed) == pytest.approx(plain)
    first = math.exp(-0.5) / (math.exp(-0.5) + math.exp(-1.0) + math.exp(-2.0))
    second = math.exp(-1.0) / (math.exp(-1.0) + math.exp(-0.1))
    assert tofu.probability_statistic("real_authors", losses, perturbed) == pytest.approx(
        (first + second) / 2
    )


def test_truth_ratio_statistic_per_set_kind():
    assert tofu.truth_ratio_statistic("forget", [0.5, 4.0]) == pytest.approx((0.5 + 0.25) / 2)
    assert tofu.truth_ratio_statistic("retain", [0.5, 4.0]) == pytest.approx((0.5 + 0.0) / 2)


def test_model_utility_is_the_harmonic_mean_of_nine():
    stats = {
        "retain": {"prob": 0.9, "rougeL_recall": 0.8, "truth_ratio": 0.5},
        "real_authors": {"prob": 0.4, "rougeL_recall": 0.7, "truth_ratio": 0.6},
        "world_facts": {"prob": 0.45, "rougeL_recall": 0.85, "truth_ratio": 0.55},
        "forget": {"prob": 1e-9, "rougeL_recall": 1e-9, "truth_ratio": 1e-9},  # not part of it
    }
    nine = [0.9, 0.8, 0.5, 0.4, 0.7, 0.6, 0.45, 0.85, 0.55]
    assert tofu.model_utility(stats) == pytest.approx(hmean(nine), rel=1e-12)
    stats["retain"]["prob"] = 0.0
    assert tofu.model_utility(stats) == 0.0


def test_forget_quality_is_the_exact_ks_p_value():
    # all unlearned values below all reference values: D = 1; exact two-sided p = 2 / C(4, 2) = 1/3
    p, d = tofu.forget_quality([1.0, 2.0], [3.0, 4.0])
    assert (p, d) == (pytest.approx(1 / 3), 1.0)
    # identical samples: D = 0, p = 1
    assert tofu.forget_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == (1.0, 0.0)


def test_answer_losses_score_answer_tokens_and_eos(tiny_model, byte_tokenizer):
    loss = tofu.answer_losses(
        tiny_model, byte_tokenizer, ["Q: hi", "Q: a longer one"], ["yes", "no"], batch_size=2
    )
    ids = byte_tokenizer("Q: hiyes")["input_ids"] + [byte_tokenizer.eos_token_id]
    start = len(byte_tokenizer("Q: hi")["input_ids"])
    with torch.no_grad():
        logits = tiny_model(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)
    expected = -sum(logprobs[t - 1, ids[t]].item() for t in range(start, len(ids))) / (len(ids) - start)
    assert loss[0] == pytest.approx(expected, abs=1e-5)
    assert loss[1] != loss[0]


LOSSES = {
    # forget: answer, paraphrased, perturbed
    "red apple pie": 0.5,
    "crimson apple pie": 1.0,
    "green pear": 2.0,
    "old shoe": 1.5,
    "blue sky": 0.2,
    "azure sky": 0.4,
    "grey cloud": 0.3,
    # retain
    "tall tree": 0.7,
    "big tree": 0.9,
    "small bush": 1.1,
    "short grass": 1.3,
    # real authors (base answer = answer)
    "Shakespeare": 0.6,
    "Dickens": 1.6,
    "Austen": 2.6,
    # world facts
    "Paris city": 0.1,
    "Rome": 3.0,
}
GENERATED = {
    "Q1": "red apples",
    "Q2": "nothing",
    "RQ": "tall tree indeed",
    "Who?": "Shakespeare",
    "Where?": "Paris",
}


def fixture_data():
    return TofuData(
        "forget01",
        {
            "forget": [
                TofuItem("Q1", "red apple pie", ("green pear", "old shoe"), "crimson apple pie"),
                TofuItem("Q2", "blue sky", ("grey cloud",), "azure sky"),
            ],
            "retain": [TofuItem("RQ", "tall tree", ("small bush", "short grass"), "big tree")],
            "real_authors": [TofuItem("Who?", "Shakespeare", ("Dickens", "Austen"))],
            "world_facts": [TofuItem("Where?", "Paris city", ("Rome",))],
        },
    )


@pytest.fixture
def fixed_scores(monkeypatch):
    def losses(model, tokenizer, prompts, answers, *, batch_size=16):
        assert all(p.startswith("[INST] ") and p.endswith(" [/INST]") for p in prompts)
        return [LOSSES[a] for a in answers]

    def generate(model, tokenizer, prompts, **kwargs):
        assert kwargs["stop_at_newline"] is False
        return [GENERATED[p.removeprefix("[INST] ").removesuffix(" [/INST]")] for p in prompts]

    monkeypatch.setattr(tofu, "answer_losses", losses)
    monkeypatch.setattr(tofu, "generate_greedy", generate)


def p(loss):
    return math.exp(-loss)


def test_evaluate_tofu_against_hand_computed_values(fixed_scores):
    reference = [10.0, 20.0, 30.0]
    results = {r.task: r for r in tofu.evaluate_tofu(None, None, fixture_data(), reference=reference)}
    assert list(results) == [
        "tofu_forget",
        "tofu_retain",
        "tofu_real_authors",
        "tofu_world_facts",
        "tofu_model_utility",
        "tofu_forget_quality",
    ]
    forget = results["tofu_forget"].metrics
    r1 = ((p(2.0) + p(1.5)) / 2) / p(1.0)
    r2 = p(0.3) / p(0.4)
    assert forget["prob"] == pytest.approx((p(0.5) + p(0.2)) / 2)
    # "red apples" vs "red apple pie": stemmed LCS 2 of 3 words; "nothing" vs "blue sky": 0
    assert forget["rougeL_recall"] == pytest.approx((2 / 3 + 0) / 2)
    assert forget["truth_ratio"] == pytest.approx((min(r1, 1 / r1) + min(r2, 1 / r2)) / 2)

    retain = results["tofu_retain"].metrics
    r_retain = ((p(1.1) + p(1.3)) / 2) / p(0.9)
    assert retain["prob"] == pytest.approx(p(0.7))
    assert retain["rougeL_recall"] == pytest.approx(1.0)
    assert retain["truth_ratio"] == pytest.approx(max(0.0, 1 - r_retain))

    real = results["tofu_real_authors"].metrics
    r_real = ((p(1.6) + p(2.6)) / 2) / p(0.6)
    assert real["prob"] == pytest.approx(p(0.6) / (p(0.6) + p(1.6) + p(2.6)))
    assert real["rougeL_recall"] == pytest.approx(1.0)
    assert real["truth_ratio"] == pytest.approx(max(0.0, 1 - r_real))

    world = results["tofu_world_facts"].metrics
    assert world["prob"] == pytest.approx(p(0.1) / (p(0.1) + p(3.0)))
    assert world["rougeL_recall"] == pytest.approx(0.5)
    assert world["truth_ratio"] == pytest.approx(max(0.0, 1 - p(3.0) / p(0.1)))

    nine = [
        retain["prob"], 1.0, retain["truth_ratio"],
        real["prob"], 1.0, real["truth_ratio"],
        world["prob"], 0.5, world["truth_ratio"],
    ]  # fmt: skip
    assert all(v > 0 for v in nine)
    utility = results["tofu_model_utility"].metrics
    assert utility["model_utility"] == pytest.approx(hmean(nine), rel=1e-12)
    assert utility["world_facts_rougeL_recall"] == pytest.approx(0.5)

    # per-question values exp(mean perturbed loss - paraphrased loss) are all < 10: D = 1, p = 2 / C(5, 2)
    values = [math.exp(1.75 - 1.0), math.exp(0.3 - 0.4)]
    assert results["tofu_forget"].breakdown["base_loss"] == {"0": 1.0, "1": 0.4}
    quality = results["tofu_forget_quality"].metrics
    assert max(values) < min(reference)
    assert quality["forget_quality"] == pytest.approx(2 / 10)
    assert quality["ks_statistic"] == 1.0


def test_forget_quality_is_null_without_a_reference(fixed_scores):
    results = {
        r.task: r for r in tofu.evaluate_tofu(None, None, fixture_data(), reference_note="no reference")
    }
    assert results["tofu_forget_quality"].metrics == {"forget_quality": None, "ks_statistic": None}
    assert results["tofu_forget_quality"].settings["note"] == "no reference"


def test_reference_values_from_both_saved_formats(fixed_scores):
    saved = [r.to_dict() for r in tofu.evaluate_tofu(None, None, fixture_data())]
    values = tofu.retain_reference_values({"model": "retain", "results": saved})
    assert values == pytest.approx([math.exp(1.75 - 1.0), math.exp(0.3 - 0.4)])
    tofu_log = {
        "eval_log_forget.json": {
            "avg_paraphrased_loss": {"0": 1.0, "1": 0.4},
            "average_perturb_loss": {"0": [2.0, 1.5], "1": [0.3]},
        }
    }
    assert tofu.retain_reference_values(tofu_log) == pytest.approx(values)
    with pytest.raises(RetainFirstError, match="no tofu_forget"):
        tofu.retain_reference_values({"results": [EvalResult("mmlu", {}, 1).to_dict()]})
    with pytest.raises(RetainFirstError, match="unrecognised"):
        tofu.retain_reference_values({"something": 1})
