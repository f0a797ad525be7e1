"""The knowledge filter: keep only the facts the model answers, scored as the evaluation scores them."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from retainfirst.benchmarks.facts.general import general_probe
from retainfirst.benchmarks.facts.schema import LEVELS, Fact, FactFamily
from retainfirst.benchmarks.facts.templates import fact_probes
from retainfirst.data.probes import Probe
from retainfirst.errors import RetainFirstError
from retainfirst.evals import generation

# (facts, their probes) -> which probes the model answers right; probes[i] belongs to facts[i]
KnowledgeFilter = Callable[[Sequence[Fact], Sequence[Probe]], list[bool]]


class GreedyKnowledgeFilter:
    """Keeps probes the model answers right, scored exactly as the generation evaluation scores them.

    Why the evaluation's own code: a fact the filter keeps must score ROUGE-L recall 1 before
    unlearning under the same prompt format, decoding and tokenisation of the answer. The default
    tokenisation is ``rouge_score``'s (lower-cased alphanumeric words): RWKU's whitespace split
    scores "Paris, France." as a miss for "Paris" ("Paris," != "Paris"), which for a 135M model
    that likes to add the country would drop most correct answers. Evaluate the benchmark with the
    same settings (``FactBenchmark.eval_settings``).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 32,
        max_new_tokens: int = 16,
        prompt_format: str = "auto",
        min_recall: float = 1.0,
        rouge_tokenization: str = "rouge_score",
    ):
        self.scorer = generation.make_rouge_scorer(rouge_tokenization)
        self.rouge_tokenization = rouge_tokenization
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.prompt_format = generation.resolve_prompt_format(tokenizer, prompt_format)
        self.min_recall = min_recall

    def settings(self) -> dict[str, Any]:
        return {
            "prompt_format": self.prompt_format,
            "max_new_tokens": self.max_new_tokens,
            "min_rougeL_recall": self.min_recall,
            "decoding": "greedy",
            "rouge_tokenization": self.rouge_tokenization,
        }

    def __call__(self, facts: Sequence[Fact], probes: Sequence[Probe]) -> list[bool]:
        if not probes:
            return []
        prompts = [generation.format_prompt(probe, self.tokenizer, self.prompt_format) for probe in probes]
        answers = generation.generate_greedy(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            add_special_tokens=self.prompt_format == "raw",
        )
        return [
            generation.rouge_l_recall(answer, probe.answer, self.scorer) >= self.min_recall
            for answer, probe in zip(answers, probes, strict=True)
        ]


def _seeded_order(facts: Sequence[Fact], seed: int) -> list[Fact]:
    """Candidates in a seeded order that is shared across families for the same subject.

    Sorting by a hash of (seed, subject) tests the same countries first in the capital, language
    and currency families, so kept entities more often carry several facts.
    """

    def rank(fact: Fact) -> str:
        return hashlib.sha256(f"{seed}:{fact.subject.casefold()}".encode()).hexdigest()

    return sorted(facts, key=rank)


def filter_known_facts(
    families: Sequence[FactFamily],
    knowledge_filter: KnowledgeFilter,
    seed: int,
    needed_per_family: int | None,
    levels: Sequence[str] = ("qa",),
    chunk_size: int = 32,
    max_tested_per_family: int | None = None,
) -> tuple[list[Fact], dict[str, dict[str, int]]]:
    """Facts whose probes of every level in ``levels`` pass ``knowledge_filter``, tested in chunks.

    Each round sends the next candidates of every family that still needs facts in one call (better
    batching): twice the number still missing, at most ``chunk_size``. Levels are checked in order,
    each only on the facts that passed the previous one. A family stops at ``needed_per_family``
    kept facts or ``max_tested_per_family`` tested ones (None: no limit; both None tests all).
    """
    unknown = [level for level in levels if level not in LEVELS]
    if not levels or unknown:
        raise RetainFirstError(f"filter levels {list(levels)!r} must be a non-empty subset of {list(LEVELS)}")
    queues = {family.name: _seeded_order(family.facts, seed) for family in families}
    by_name = {family.name: family for family in families}
    kept: dict[str, list[Fact]] = {family.name: [] for family in families}
    tested: Counter[str] = Counter()
    while True:
        batch: list[Fact] = []
        for name, queue in queues.items():
            if needed_per_family is not None and len(kept[name]) >= needed_per_family:
                continue
            size = chunk_size
            if needed_per_family is not None:  # expect about half to pass: test twice what is missing
                size = min(chunk_size, 2 * (needed_per_family - len(kept[name])))
            if max_tested_per_family is not None:
                size = min(size, max_tested_per_family - tested[name])
            chunk = queue[tested[name] : tested[name] + max(size, 0)]
            tested[name] += len(chunk)
            batch.extend(chunk)
        if not batch:
            break
        probes = [fact_probes(fact, by_name[fact.family].templates, seed) for fact in batch]
        survivors = list(range(len(batch)))
        for level in levels:
            passed = knowledge_filter([batch[i] for i in survivors], [probes[i][level] for i in survivors])
            survivors = [i for i, ok in zip(survivors, passed, strict=True) if ok]
        for index in survivors:
            kept[batch[index].family].append(batch[index])
    facts: list[Fact] = []
    counts: dict[str, dict[str, int]] = {}
    for family in families:
        mine = kept[family.name]
        facts.extend(mine)
        counts[family.name] = {
            "candidates": len(family.facts),
            "tested": tested[family.name],
            "kept": len(mine),
        }
    return facts, counts


def known_facts_filter(known: Iterable[Fact | tuple[str, str]]) -> KnowledgeFilter:
    """A filter that passes exactly the given (family, subject) facts: tests, offline or cached builds."""
    keys = {k.key if isinstance(k, Fact) else (str(k[0]), str(k[1])) for k in known}

    def check(facts: Sequence[Fact], probes: Sequence[Probe]) -> list[bool]:
        return [fact.key in keys for fact in facts]

    return check


def filter_general_questions(questions: Sequence[Fact], knowledge_filter: KnowledgeFilter) -> list[Fact]:
    """The general-knowledge questions whose QA probe passes ``knowledge_filter`` (all tested: one call)."""
    if not questions:
        return []
    passed = knowledge_filter(questions, [general_probe(q) for q in questions])
    return [question for question, ok in zip(questions, passed, strict=True) if ok]
