"""Scores from the tasks' metadata: which results feed which number, roles, directions, precedence."""

from __future__ import annotations

import math

import pytest

from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import get_tasks
from retainfirst.report import RunSummary, forget_score, headline_catalogue, headline_metrics, recovery
from retainfirst.report.tables import table_cells


def test_catalogue_orders_by_role_then_registration():
    tasks = get_tasks(["perplexity", "mia", "wmdp_cyber", "mmlu", "facts", "wmdp_bio"])
    assert [h.key for h in headline_catalogue(tasks)] == [
        "forget",
        "wmdp_bio",
        "wmdp_cyber",
        "heldout",
        "general_qa",
        "neighbor",
        "mmlu",
        "ppl",
        "retain_fit",
        "mia",
    ]


def test_pooled_numbers_weight_by_n_and_single_numbers_are_taken_as_is():
    results = [
        EvalResult("forget_fb", {"rougeL_recall": 0.5}, n=1),
        EvalResult("rwku_forget_qa", {"rougeL_recall": 0.0}, n=3),
        EvalResult("mmlu", {"acc": 0.1}, n=3),  # 0.1 * 3 / 3 != 0.1 in floats: not pooled
        EvalResult("mia", {"auc_loss": 0.25}, n=8),
        EvalResult("unclaimed", {"acc": 1.0}, n=1),
    ]
    metrics = headline_metrics(results, get_tasks(["facts", "rwku", "mmlu", "mia"]))
    assert metrics == {"forget": 0.125, "mmlu": 0.1, "mia": 0.25}


def test_forget_score_prefers_probe_recall_over_wmdp():
    assert forget_score({"forget": 0.3, "wmdp_bio": 0.9, "mmlu": 0.5}) == 0.3
    assert forget_score({"wmdp_bio": 0.2, "wmdp_cyber": 0.4}) == pytest.approx(0.3)
    assert math.isnan(forget_score({"mmlu": 0.5, "mia": 0.1}))


def test_recovery_covers_utility_numbers_only():
    before = {"neighbor": 0.5, "mmlu": 0.4, "ppl": 10.0, "mia": 0.5, "wmdp_bio": 0.5}
    after = {"neighbor": 0.25, "mmlu": 0.4, "ppl": 20.0, "mia": 0.25, "wmdp_bio": 0.25}
    assert recovery(before, after) == {"neighbor": 50.0, "mmlu": 100.0, "ppl": 50.0}


def test_lm_eval_numbers_are_diagnostic_columns():
    tasks = get_tasks(["mmlu", "lm_eval:arc_easy"])
    results = [EvalResult("mmlu", {"acc": 0.5}, 4), EvalResult("arc_easy", {"acc": 0.75}, 4)]
    metrics = headline_metrics(results, tasks)
    assert metrics == {"mmlu": 0.5, "lm_eval:arc_easy": 0.75}
    row = RunSummary("before", "before", metrics)
    headers, cells = table_cells([row], headline_catalogue(tasks))
    assert headers == ["run", "MMLU ↑", "lm_eval:arc_easy ↑"]
    assert cells == [["before", "0.500", "0.750"]]


def test_numbers_no_task_describes_still_get_a_column():
    headers, cells = table_cells([RunSummary("r", "sum", {"mmlu": 0.5, "custom": 2.0})])
    assert headers == ["run", "MMLU ↑", "custom ↑"] and cells == [["r", "0.500", "2.000"]]
