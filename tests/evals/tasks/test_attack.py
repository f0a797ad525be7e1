"""The attack summary numbers: headline values as the report computes them, the recovered fraction."""

from __future__ import annotations

import math

import pytest

from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import get_task
from retainfirst.evals.tasks.attack import (
    forget_score,
    headline_values,
    recovered_fraction,
    utility_kept,
)


def test_headline_values_pool_probe_levels_and_forget_score_takes_the_top_precedence():
    tasks = [get_task("facts"), get_task("mmlu"), get_task("wmdp_bio"), get_task("perplexity")]
    results = [
        EvalResult("forget_fb", {"rougeL_recall": 0.5}, 2),
        EvalResult("forget_qa", {"rougeL_recall": 0.2}, 3),
        EvalResult("neighbor_qa", {"rougeL_recall": 0.9}, 4),
        EvalResult("mmlu", {"acc": 0.25}, 40),
        EvalResult("wmdp_bio", {"acc": 0.75}, 10),
        EvalResult("perplexity", {"perplexity": 12.0}, 5),
        EvalResult("relearn/forget_fb", {"rougeL_recall": 1.0}, 2),  # nobody's: ignored
    ]
    values = headline_values(results, tasks)
    assert {k: v for k, (_, v) in values.items()} == {
        "forget": (0.5 * 2 + 0.2 * 3) / 5,
        "neighbor": 0.9,
        "mmlu": 0.25,
        "wmdp_bio": 0.75,
        "ppl": 12.0,
    }
    assert forget_score(values) == (0.5 * 2 + 0.2 * 3) / 5  # probe recall outranks WMDP accuracy
    del values["forget"]
    assert forget_score(values) == 0.75
    assert forget_score({}) is None


def test_recovered_fraction():
    assert recovered_fraction(0.9, 0.1, 0.5) == (0.5 - 0.1) / (0.9 - 0.1)
    assert recovered_fraction(0.9, 0.1, 0.1) == 0.0
    assert recovered_fraction(0.9, 0.1, 0.9) == 1.0
    assert recovered_fraction(0.9, 0.1, 0.0) == pytest.approx(-0.125)  # the attack forgot more
    assert recovered_fraction(0.5, 0.5, 0.9) is None  # nothing was forgotten
    assert recovered_fraction(0.4, 0.5, 0.9) is None
    assert recovered_fraction(None, 0.1, 0.5) is None


def test_utility_kept_inverts_lower_is_better_numbers():
    tasks = [get_task("mmlu"), get_task("perplexity"), get_task("facts")]
    unlearned = headline_values(
        [EvalResult("mmlu", {"acc": 0.4}, 1), EvalResult("perplexity", {"perplexity": 10.0}, 1)], tasks
    )
    after = headline_values(
        [
            EvalResult("mmlu", {"acc": 0.3}, 1),
            EvalResult("perplexity", {"perplexity": 20.0}, 1),
            EvalResult("forget_qa", {"rougeL_recall": 0.3}, 1),
        ],
        tasks,
    )
    kept = utility_kept(unlearned, after)
    assert kept == {"mmlu": 100.0 * 0.3 / 0.4, "ppl": 50.0}
    assert all(math.isfinite(v) for v in kept.values())
