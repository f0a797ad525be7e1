from __future__ import annotations

import math

from retainfirst.evals.tasks import get_task


def test_metadata_is_ppl_lower_is_better():
    task = get_task("perplexity")
    assert (task.role, task.headline, task.higher_is_better) == ("utility", "perplexity", False)
    [headline] = task.headlines()
    assert (headline.key, headline.metric, headline.fmt) == ("ppl", "perplexity", "{:.2f}")


def test_texts_from_file_or_benchmark(make_context, tiny_bench, model, byte_tokenizer):
    task = get_task("perplexity")
    from_file = make_context(ppl_texts="general.txt", ppl_max_length=16)
    assert task.sources(from_file.config) == set()
    texts = task.prepare(from_file)
    assert texts == ["The cat sat on the mat.", "A quick brown fox jumps."]
    [result] = task.run(model, byte_tokenizer, texts, from_file.config.eval)
    assert result.task == "perplexity" and math.isfinite(result.metrics["perplexity"])
    assert result.settings["max_length"] == 16
    from_bench = make_context()
    assert task.sources(from_bench.config) == {"facts"}
    assert task.prepare(from_bench) == tiny_bench.general_texts
