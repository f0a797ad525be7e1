"""Bootstrap intervals, paired tests, Holm and the verdict sentences, on constructed data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import wilcoxon

from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import EvalTask, Headline
from retainfirst.report.stats import (
    Comparison,
    Estimate,
    Measurement,
    bootstrap_p_value,
    compare,
    comparison_sentence,
    estimate,
    holm,
    item_scores,
    measure,
    wilcoxon_p,
    with_holm,
)

FORGET = Headline("forget", "forget", "score", False, pool=True, precedence=1)
HELDOUT = Headline("heldout", "utility", "score", True, pool=True)
PPL = Headline("ppl", "utility", "perplexity", False)
HEADLINES = [FORGET, HELDOUT, PPL]


class ProbeTask(EvalTask):
    """Results ``f_*`` feed the forget headline, ``u_*`` the held-out utility, ``ppl`` perplexity."""

    name = "probe_test"
    role = "forget"
    headline = "score"
    higher_is_better = False

    def headlines(self):
        return HEADLINES

    def headline_for(self, result):
        return {"f": FORGET, "u": HELDOUT, "ppl": PPL}.get(result.task.split("_")[0])


def probe_result(task: str, scores: list[float], keep: int | None = None) -> EvalResult:
    samples = [{"score": s, "answer": "x"} for s in scores[:keep]]
    return EvalResult(task, {"score": sum(scores) / len(scores)}, n=len(scores), samples=samples)


def test_item_scores_need_every_item():
    assert item_scores(probe_result("f_a", [0.5, 1.0])) == [0.5, 1.0]
    assert item_scores(probe_result("f_a", [0.5, 1.0, 0.0], keep=2)) is None  # truncated samples
    mcq = EvalResult("mmlu", {"acc": 0.5}, n=2, samples=[{"correct": True}, {"correct": False}])
    assert item_scores(mcq) == [1.0, 0.0]
    assert item_scores(EvalResult("ppl", {"perplexity": 3.0}, n=4)) is None


def test_measure_pools_items_in_result_order_and_drops_incomplete_headlines():
    results = [
        probe_result("f_fb", [1.0, 0.0]),
        probe_result("f_qa", [0.5, 0.5, 0.0]),
        probe_result("u_fb", [1.0, 0.0, 1.0], keep=2),
        EvalResult("ppl", {"perplexity": 7.0}, n=3),
    ]
    m = measure(results, [ProbeTask()])
    assert m.values == pytest.approx({"forget": 2.0 / 5, "heldout": 2 / 3, "ppl": 7.0})
    assert set(m.items) == {"forget"}
    assert m.items["forget"].tolist() == [1.0, 0.0, 0.5, 0.5, 0.0]


def test_single_seed_interval_is_the_plain_bootstrap_of_the_item_mean():
    rng = np.random.default_rng(5)
    items = rng.random(20)
    run = Measurement({"heldout": float(items.mean())}, {"heldout": items})
    before = {"heldout": 0.8}
    est = estimate([run], before, HEADLINES, resamples=500, confidence=0.9, seed=3)["utility"]
    draws = np.random.default_rng([3, 0]).integers(0, 20, size=(500, 20))
    manual = 100 * items[draws].mean(axis=1) / 0.8
    assert est.mean == pytest.approx(100 * items.mean() / 0.8)
    assert (est.low, est.high) == pytest.approx(tuple(np.percentile(manual, [5, 95])))
    again = estimate([run], before, HEADLINES, resamples=500, confidence=0.9, seed=3)["utility"]
    assert again == est  # deterministic for a fixed seed


def test_seeds_are_resampled_and_a_quantity_without_items_still_varies_over_seeds():
    runs = [Measurement({"forget": f, "ppl": p}) for f, p in [(0.1, 10.0), (0.3, 12.0), (0.2, 11.0)]]
    est = estimate(runs, {"ppl": 10.0}, HEADLINES, resamples=400, seed=0)
    assert est["forget"].mean == pytest.approx(0.2)
    assert 0.1 <= est["forget"].low < 0.2 < est["forget"].high <= 0.3
    assert est["utility"].mean == pytest.approx(np.mean([100, 100 * 10 / 12, 100 * 10 / 11]))
    one = estimate(runs[:1], {"ppl": 10.0}, HEADLINES)
    assert one["forget"] == Estimate(0.1, None, None, 0.95)  # one seed, no items: nothing to resample


def _seeded_runs(base: np.ndarray, shift: float, noise: float, seeds: int, rng) -> list[Measurement]:
    runs = []
    for _ in range(seeds):
        items = np.clip(base + shift + rng.normal(0, noise, base.size), 0, 1)
        runs.append(Measurement({"heldout": float(items.mean()), "forget": 0.2}, {"heldout": items}))
    return runs


def test_paired_comparison_detects_a_consistent_shift_and_not_noise():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, 60)  # probes differ a lot from each other: pairing removes that
    before = {"heldout": 0.5}
    sum_runs = _seeded_runs(base, 0.0, 0.02, 3, rng)
    better = _seeded_runs(base, 0.05, 0.02, 3, rng)
    same = _seeded_runs(base, 0.0, 0.02, 3, rng)
    shifted = compare(better, sum_runs, before, HEADLINES, names=("sago", "sum"), resamples=1000)
    assert shifted.difference.mean == pytest.approx(10.0, abs=1.0)  # +0.05 recall on 0.5 = +10 points
    assert shifted.p_value < 0.01 and shifted.difference.low > 0
    assert shifted.per_headline["heldout"]["p_wilcoxon"] < 0.001
    null = compare(same, sum_runs, before, HEADLINES, names=("pcgrad", "sum"), resamples=1000)
    assert null.p_value > 0.2 and null.difference.low < 0 < null.difference.high
    # an unpaired design (independent probes) would have to be much wider than the paired interval
    assert shifted.difference.high - shifted.difference.low < 6.0


def test_bootstrap_p_value_by_hand():
    assert bootstrap_p_value(np.array([1.0, 2.0, 3.0, -1.0])) == pytest.approx(2 * 2 / 5)
    assert bootstrap_p_value(np.array([1.0, 2.0, 3.0])) == pytest.approx(2 * 1 / 4)
    assert bootstrap_p_value(np.array([2.0, 2.0])) is None
    assert bootstrap_p_value(np.array([1.0, math.nan])) is None


def test_wilcoxon_matches_scipy_and_all_zero_is_one():
    d = np.array([0.3, -0.1, 0.2, 0.0, 0.25, 0.4, -0.05, 0.15])
    assert wilcoxon_p(d) == pytest.approx(wilcoxon(d[d != 0]).pvalue)
    assert wilcoxon_p(np.zeros(5)) == 1.0


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, None, 0.01]) == [pytest.approx(0.5), None, pytest.approx(0.02)]


def test_holm_caps_at_one_and_keeps_order():
    assert holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([0.7, 0.2, 0.9]) == pytest.approx([1.0, 0.6, 1.0])
    assert holm([0.2, 0.3, 0.01]) == pytest.approx([0.4, 0.4, 0.03])


def _comparison(mean, low, high, p, adjusted=None):
    return Comparison("sago", "sum", "utility", Estimate(mean, low, high, 0.95), p, {}, adjusted)


@pytest.mark.parametrize(
    "comparison, text",
    [
        (
            _comparison(3.1, -0.5, 6.7, 0.09),
            "sago vs sum: utility +3.1 points (95 % CI -0.5 to 6.7), p = 0.09: not significant at 0.05.",
        ),
        (
            _comparison(4.0, 1.2, 6.9, 0.004, 0.008),
            "sago vs sum: utility +4.0 points (95 % CI 1.2 to 6.9), p = 0.004 (Holm-adjusted: p = 0.008): "
            "significant at 0.05.",
        ),
        (
            _comparison(4.0, 1.2, 6.9, 0.03, 0.09),
            "sago vs sum: utility +4.0 points (95 % CI 1.2 to 6.9), p = 0.03 (Holm-adjusted: p = 0.09): "
            "not significant at 0.05.",
        ),
        (
            _comparison(-2.5, None, None, None),
            "sago vs sum: utility -2.5 points (no CI: one seed and no per-item scores); cannot be tested.",
        ),
        (
            _comparison(-9.0, -12.0, -6.0, 0.0004),
            "sago vs sum: utility -9.0 points (95 % CI -12.0 to -6.0), p < 0.001: significant at 0.05.",
        ),
    ],
)
def test_verdict_sentences(comparison, text):
    assert comparison_sentence(comparison) == text


def test_with_holm_fills_adjusted_p_values():
    out = with_holm([_comparison(1, 0, 2, 0.02), _comparison(1, 0, 2, None), _comparison(1, 0, 2, 0.04)])
    assert [c.p_adjusted for c in out] == [pytest.approx(0.04), None, pytest.approx(0.04)]
