from __future__ import annotations

import pytest

from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import get_task


def test_metadata_forget_and_neighbor_numbers():
    task = get_task("facts")
    assert (task.role, task.headline, task.higher_is_better) == ("forget", "rougeL_recall", False)
    forget, neighbor = task.headlines()
    assert (forget.key, forget.role, forget.pool, forget.higher_is_better) == (
        "forget",
        "forget",
        True,
        False,
    )
    assert (neighbor.key, neighbor.role, neighbor.higher_is_better) == ("neighbor", "utility", True)
    assert task.headline_for(EvalResult("forget_aa", {}, 1)) is forget
    assert task.headline_for(EvalResult("neighbor_qa", {}, 1)) is neighbor
    assert task.headline_for(EvalResult("rwku_forget_fb", {}, 1)) is None
    assert task.sources(None) == {"facts"}


def test_runs_every_probe_family_with_the_benchmark_settings(make_context, model, byte_tokenizer, tiny_bench):
    task = get_task("facts")
    context = make_context(tasks=["facts"], probe_limit=2)
    data = task.prepare(context)
    assert list(data["probes"]) == list(tiny_bench.probes)
    assert all(len(p) == min(2, len(tiny_bench.probes[k])) for k, p in data["probes"].items())
    assert data["settings"] == tiny_bench.eval_settings
    results = task.run(model, byte_tokenizer, data, context.config.eval)
    assert [r.task for r in results] == list(tiny_bench.probes)
    for result in results:
        assert result.n == len(data["probes"][result.task])
        assert 0.0 <= result.metrics["rougeL_recall"] <= 1.0
    assert "probes" in task.describe(data)


@pytest.mark.parametrize("limit", [None, 1])
def test_probe_limit(make_context, tiny_bench, limit):
    data = get_task("facts").prepare(make_context(probe_limit=limit))
    for family, probes in data["probes"].items():
        assert probes == tiny_bench.probes[family][:limit] if limit else probes == tiny_bench.probes[family]
