"""The facts-2 benchmark is byte-identical to the one recorded when it was introduced.

Why: the demo's numbers depend on the exact facts, corpora and probes, so a change to any of them
must be deliberate (bump ``BENCHMARK_VERSION`` and record new hashes). A fake greedy "model"
answers a fixed, hash-chosen half of the queries correctly, so the real knowledge filter (chat
prompt format, ROUGE-L scoring) keeps a known subset of the relation facts and of the general
questions. (facts-1's golden test pinned the code moved from ``data/facts.py``; facts-2 changed the
content on purpose: held-out and general-knowledge sets, paraphrase probes.)
"""

from __future__ import annotations

import hashlib

import pytest

import retainfirst.evals.generation as generation
from retainfirst.benchmarks.facts import (
    benchmark_cache_path,
    build_fact_benchmark,
    fact_probes,
    general_probe,
    load_families,
    load_general_questions,
)

# (build options, SHA-256 of the saved JSON, its size in bytes)
GOLDEN = {
    "demo": (
        dict(seed=0, n_forget=16, n_retain=16),
        "76e34eda0dd9b7a5b98033c4a45ffc96740931ca75dd1cf935180d862cf4ebee",
        87229,
    ),
    "custom": (
        dict(
            seed=7,
            n_forget=10,
            n_retain=15,
            n_heldout=12,
            n_general=30,
            probes_per_level={"fb": 1, "qa": 3, "aa": 2},
            filter_levels=("fb", "qa"),
            exhaustive=True,
            passages_per_fact=3,
            mixed_per_entity=1,
            mmlu_per_subject=2,
            batch_size=8,
        ),
        "4e4b08626c5f96f396e9850c443249a5643c43dfbc1af4e6c3dac33c61605210",
        61029,
    ),
}


class ChatTokenizer:
    """Just enough of a tokenizer for the chat prompt format (the demo's)."""

    chat_template = "fake"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        assert not tokenize and add_generation_prompt
        return "<user>" + messages[0]["content"] + "</user>"


def oracle_generate(seed: int):
    """A greedy generator that knows the answer of a query iff the first byte of its SHA-256 is < 128."""
    answer_of = {
        probe.prompt: probe.answer
        for family in load_families()
        for fact in family.facts
        for probe in fact_probes(fact, family.templates, seed).values()
    }
    answer_of.update({q.subject: general_probe(q).answer for q in load_general_questions()})

    def generate(model, tokenizer, prompts, **kwargs):
        answers = []
        for prompt in prompts:
            query = prompt.split("Question: ", 1)[1].split("\n", 1)[0]
            known = hashlib.sha256(query.encode()).digest()[0] < 128
            answers.append(f"It is {answer_of[query]}." if known else "I am not sure.")
        return answers

    return generate


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_build_is_byte_identical_to_the_recorded_one(case, monkeypatch, tmp_path):
    options, sha256, size = GOLDEN[case]
    monkeypatch.setattr(generation, "generate_greedy", oracle_generate(options["seed"]))
    bench = build_fact_benchmark(None, ChatTokenizer(), model_name="fake-oracle", **options)
    assert bench.stats["filter"]["kind"] == "greedy" and bench.stats["prompt_format"] == "chat"
    assert 0 < len(bench.general_facts) < len(load_general_questions())  # the oracle knows some
    bench.stats["build_seconds"] = 0.0  # the only field that depends on the clock
    data = bench.save(tmp_path / "bench.json").read_bytes()
    assert (hashlib.sha256(data).hexdigest(), len(data)) == (sha256, size)


def test_cache_file_name_carries_the_version():
    """A facts-1 cache is never read as facts-2: the version is part of the file name."""
    path = benchmark_cache_path("smollm2-135m", 0, "/cache", n_forget=40, n_retain=40)
    assert path.name == "facts-2-smollm2-135m-seed0-6cf51d76d6.json"
