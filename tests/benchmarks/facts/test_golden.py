"""The facts benchmark is byte-identical to the one the original ``data/facts.py`` built.

Why: the demo's numbers depend on the exact facts, corpora and probes, so moving the code into
``benchmarks/facts/`` must not change a byte. A fake greedy "model" answers a fixed, hash-chosen
half of the queries correctly, so the real knowledge filter (chat prompt format, ROUGE-L scoring)
keeps a known subset; the hashes below were recorded from the code before the move (commit dc6c335).
"""

from __future__ import annotations

import hashlib

import pytest

import retainfirst.evals.generation as generation
from retainfirst.benchmarks.facts import (
    benchmark_cache_path,
    build_fact_benchmark,
    fact_probes,
    load_families,
)

# (build options, SHA-256 of the saved JSON, its size in bytes)
GOLDEN = {
    "demo": (dict(seed=0), "6deab5628e032e9bb570d34798e4ad5ad8f06696813c69534ee5b9e862c93d38", 90536),
    "custom": (
        dict(
            seed=7,
            n_forget=10,
            n_retain=15,
            filter_levels=("fb", "qa"),
            exhaustive=True,
            passages_per_fact=3,
            mixed_per_entity=1,
            mmlu_per_subject=2,
            batch_size=8,
        ),
        "e599e253f75afd1b9247742975d4cedabec27722435ba4da8d1c3b5e02929038",
        35145,
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

    def generate(model, tokenizer, prompts, **kwargs):
        answers = []
        for prompt in prompts:
            query = prompt.split("Question: ", 1)[1].split("\n", 1)[0]
            known = hashlib.sha256(query.encode()).digest()[0] < 128
            answers.append(f"It is {answer_of[query]}." if known else "I am not sure.")
        return answers

    return generate


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_build_is_byte_identical_to_the_original(case, monkeypatch, tmp_path):
    options, sha256, size = GOLDEN[case]
    monkeypatch.setattr(generation, "generate_greedy", oracle_generate(options["seed"]))
    bench = build_fact_benchmark(None, ChatTokenizer(), model_name="fake-oracle", **options)
    assert bench.stats["filter"]["kind"] == "greedy" and bench.stats["prompt_format"] == "chat"
    bench.stats["build_seconds"] = 0.0  # the only field that depends on the clock
    data = bench.save(tmp_path / "bench.json").read_bytes()
    assert (hashlib.sha256(data).hexdigest(), len(data)) == (sha256, size)


def test_cache_file_name_is_unchanged():
    """Caches written before the move stay valid: same version, slug and option digest."""
    path = benchmark_cache_path("smollm2-135m", 0, "/cache", n_forget=40, n_retain=40)
    assert path.name == "facts-1-smollm2-135m-seed0-6cf51d76d6.json"
