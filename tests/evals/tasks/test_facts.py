from __future__ import annotations

import pytest

from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import get_task, get_tasks


def test_metadata_heldout_is_the_primary_utility_and_retain_fit_only_a_diagnostic():
    task = get_task("facts")
    assert (task.role, task.headline, task.higher_is_better) == ("forget", "rougeL_recall", False)
    forget, heldout, general, neighbor, retain_fit = task.headlines()
    summary = {h.key: (h.role, h.pool, h.higher_is_better) for h in task.headlines()}
    assert summary == {
        "forget": ("forget", True, False),
        "heldout": ("utility", True, True),
        "general_qa": ("utility", True, True),
        "neighbor": ("utility", True, True),  # facts-1 results (neighbor_*) and RWKU's neighbours
        "retain_fit": ("diagnostic", True, True),
    }
    claims = {
        "forget_aa": forget,
        "forget_fb": forget,
        "heldout_fb": heldout,
        "heldout_qa": heldout,
        "general_qa": general,
        "retain_fit_fb": retain_fit,
        "retain_fit_qa": retain_fit,
        "neighbor_qa": neighbor,
        "rwku_forget_fb": None,
        "rwku_neighbor_qa": None,
        "general_text": None,
    }
    for name, headline in claims.items():
        assert task.headline_for(EvalResult(name, {}, 1)) is headline, name
    assert task.sources(None) == {"facts"}


def test_retain_fit_never_counts_in_utility_and_heldout_leads_the_utility_columns():
    from retainfirst.report import headline_catalogue, headline_metrics, recovery, utility

    tasks = get_tasks(["facts", "mmlu", "perplexity"])
    catalogue = [h.key for h in headline_catalogue(tasks)]
    assert catalogue[:3] == ["forget", "heldout", "general_qa"] and catalogue[-1] == "retain_fit"

    def results(heldout, general, retain_fit):
        return [
            EvalResult("forget_qa", {"rougeL_recall": 0.5}, 32),
            EvalResult("heldout_fb", {"rougeL_recall": heldout[0]}, 32),
            EvalResult("heldout_qa", {"rougeL_recall": heldout[1]}, 32),
            EvalResult("general_qa", {"rougeL_recall": general}, 60),
            EvalResult("retain_fit_fb", {"rougeL_recall": retain_fit}, 32),
            EvalResult("retain_fit_qa", {"rougeL_recall": retain_fit}, 32),
        ]

    before = headline_metrics(results((0.5, 1.0), 0.8, 0.9), tasks)
    assert before == {"forget": 0.5, "heldout": 0.75, "general_qa": 0.8, "retain_fit": 0.9}
    after = headline_metrics(results((0.25, 0.5), 0.4, 1.0), tasks)  # retain set memorised
    rec = recovery(before, after, headline_catalogue(tasks))
    assert rec == {"heldout": 50.0, "general_qa": 50.0}
    assert utility(rec) == 50.0


def test_runs_every_probe_family_with_the_benchmark_settings(make_context, model, byte_tokenizer, tiny_bench):
    task = get_task("facts")
    context = make_context(tasks=["facts"], probe_limit=2)
    data = task.prepare(context)
    assert list(data["probes"]) == [name for name, p in tiny_bench.probes.items() if p]
    assert set(data["probes"]) == {
        "forget_fb",
        "forget_qa",
        "forget_aa",
        "heldout_fb",
        "heldout_qa",
        "general_qa",
        "retain_fit_fb",
        "retain_fit_qa",
    }
    assert all(len(p) == min(2, len(tiny_bench.probes[k])) for k, p in data["probes"].items())
    assert data["settings"] == tiny_bench.eval_settings
    results = task.run(model, byte_tokenizer, data, context.config.eval)
    assert [r.task for r in results] == list(data["probes"])
    for result in results:
        assert result.n == len(data["probes"][result.task])
        assert 0.0 <= result.metrics["rougeL_recall"] <= 1.0
    assert "probes" in task.describe(data)


@pytest.mark.parametrize("limit", [None, 1])
def test_probe_limit(make_context, tiny_bench, limit):
    data = get_task("facts").prepare(make_context(probe_limit=limit))
    for family, probes in data["probes"].items():
        assert probes == tiny_bench.probes[family][:limit] if limit else probes == tiny_bench.probes[family]


def test_an_empty_probe_set_is_left_out(make_context, tiny_bench, monkeypatch):
    """A model that knows no general question gets no general_qa result (not an empty one)."""
    monkeypatch.setitem(tiny_bench.probes, "general_qa", [])
    data = get_task("facts").prepare(make_context(probe_limit=1))
    assert "general_qa" not in data["probes"] and "heldout_qa" in data["probes"]
