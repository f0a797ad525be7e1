"""Building the benchmark for a model (filter, split, corpora, probes) and caching it per model."""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from retainfirst import models
from retainfirst.benchmarks.facts.benchmark import BENCHMARK_VERSION, FactBenchmark
from retainfirst.benchmarks.facts.corpus import MMLUSubsetSpec, load_general_texts, make_corpus
from retainfirst.benchmarks.facts.families import load_families
from retainfirst.benchmarks.facts.knowledge_filter import (
    GreedyKnowledgeFilter,
    KnowledgeFilter,
    filter_known_facts,
    known_facts_filter,
)
from retainfirst.benchmarks.facts.schema import LEVELS, PROBE_SETS, Fact, FactFamily
from retainfirst.benchmarks.facts.split import split_facts
from retainfirst.benchmarks.facts.templates import fact_probes
from retainfirst.data.probes import Probe
from retainfirst.errors import RetainFirstError


def build_fact_benchmark(
    model: Any,
    tokenizer: Any,
    seed: int = 0,
    n_forget: int = 40,
    n_retain: int = 40,
    batch_size: int = 32,
    *,
    max_new_tokens: int = 16,
    passages_per_fact: int = 5,
    mixed_per_entity: int = 2,
    prompt_format: str = "auto",
    rouge_tokenization: str = "rouge_score",
    known_facts: Iterable[Fact | tuple[str, str]] | None = None,
    knowledge_filter: KnowledgeFilter | None = None,
    exhaustive: bool = False,
    filter_levels: Sequence[str] = ("qa",),
    filter_slack: float = 1.3,
    max_tested_factor: float = 3.0,
    families: Sequence[FactFamily] | None = None,
    mmlu_per_subject: int = 5,
    model_name: str | None = None,
) -> FactBenchmark:
    """Build the benchmark for ``model``: filter known facts, split, write corpora and probes.

    ``known_facts`` (family, subject pairs) or ``knowledge_filter`` replace the greedy check (tests,
    other models). ``filter_levels`` are the probe levels a fact must pass ("qa" by default; add
    "fb" for a stricter, slower filter). Without ``exhaustive`` each family stops once it has
    ``needed = ceil(filter_slack * (n_forget + n_retain) / n_families)`` kept facts or has tested
    ``max_tested_factor * needed`` candidates: on two CPU cores each tested probe costs ~0.15 s.
    """
    if n_forget < 1 or n_retain < 1:
        raise RetainFirstError(f"n_forget and n_retain must be >= 1, got {n_forget} and {n_retain}")
    started = time.perf_counter()
    families = list(families) if families is not None else load_families()
    if not families:
        raise RetainFirstError("no fact families to build the benchmark from")
    filter_settings: dict[str, Any]
    if known_facts is not None:
        knowledge_filter = known_facts_filter(known_facts)
        filter_settings = {"kind": "known_facts"}
    elif knowledge_filter is None:
        greedy = GreedyKnowledgeFilter(
            model,
            tokenizer,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            prompt_format=prompt_format,
        )
        knowledge_filter = greedy
        filter_settings = {"kind": "greedy", **greedy.settings()}
    else:
        filter_settings = {"kind": getattr(knowledge_filter, "__name__", type(knowledge_filter).__name__)}
    needed = None if exhaustive else math.ceil(filter_slack * (n_forget + n_retain) / len(families))
    max_tested = None if needed is None else math.ceil(max_tested_factor * needed)
    kept, counts = filter_known_facts(
        families, knowledge_filter, seed, needed, filter_levels, batch_size, max_tested
    )
    forget, neighbors = split_facts(kept, n_forget, n_retain, seed)

    templates_of = {family.name: family.templates for family in families}
    probes: dict[str, list[Probe]] = {name: [] for name in PROBE_SETS}
    for fact in forget:
        made = fact_probes(fact, templates_of[fact.family], seed)
        probes["forget_fb"].append(made["fb"])
        probes["forget_qa"].append(made["qa"])
        probes["forget_aa"].append(made["aa"])
    for fact in neighbors:
        made = fact_probes(fact, templates_of[fact.family], seed)
        probes["neighbor_fb"].append(made["fb"])
        probes["neighbor_qa"].append(made["qa"])
    forget_corpus = make_corpus(forget, templates_of, seed, passages_per_fact, mixed_per_entity, "forget")
    retain_corpus = make_corpus(neighbors, templates_of, seed, passages_per_fact, mixed_per_entity, "retain")

    for name, family_counts in counts.items():
        family_counts["forget"] = sum(f.family == name for f in forget)
        family_counts["neighbor"] = sum(f.family == name for f in neighbors)
    stats: dict[str, Any] = {
        "version": BENCHMARK_VERSION,
        "seed": seed,
        "model": model_name or _model_name(model),
        "n_forget": len(forget),
        "n_neighbor": len(neighbors),
        "n_forget_requested": n_forget,
        "n_retain_requested": n_retain,
        "forget_targets": len({f.subject for f in forget}),
        "neighbor_targets": len({f.subject for f in neighbors}),
        "families": counts,
        "kept_total": len(kept),
        "prompt_format": filter_settings.get("prompt_format", prompt_format),
        # evaluate_generation(**bench.eval_settings) scores the probes the way the filter did
        "evaluation": {
            "prompt_format": filter_settings.get("prompt_format", prompt_format),
            "rouge_tokenization": rouge_tokenization,
            "max_new_tokens": max_new_tokens,
        },
        "filter": {
            **filter_settings,
            "levels": [LEVELS[level] for level in filter_levels],
            "exhaustive": exhaustive,
            "needed_per_family": needed,
            "max_tested_per_family": max_tested,
        },
        "corpus": {
            "forget_passages": len(forget_corpus),
            "retain_passages": len(retain_corpus),
            "passages_per_fact": passages_per_fact,
            "mixed_per_entity": mixed_per_entity,
        },
        "probes": {name: len(items) for name, items in probes.items()},
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    return FactBenchmark(
        forget_corpus=forget_corpus,
        retain_corpus=retain_corpus,
        probes=probes,
        general_texts=load_general_texts(),
        forget_facts=forget,
        neighbor_facts=neighbors,
        mmlu_subset_spec=MMLUSubsetSpec(per_subject=mmlu_per_subject, seed=seed),
        stats=stats,
    )


def _model_name(model: Any) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or type(model).__name__)


def benchmark_cache_path(
    model_id: str, seed: int, cache_dir: str | Path | None = None, **options: Any
) -> Path:
    """Cache file of one (model, version, seed, build options) combination."""
    if cache_dir is None:
        cache_dir = models.cache_dir() / "benchmarks"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_") or "model"
    suffix = ""
    if options:
        digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:10]
        suffix = f"-{digest}"
    return Path(cache_dir) / f"{BENCHMARK_VERSION}-{slug}-seed{seed}{suffix}.json"


def load_or_build_fact_benchmark(
    model: Any,
    tokenizer: Any,
    model_id: str,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    **build_options: Any,
) -> FactBenchmark:
    """Load the cached benchmark of (model_id, BENCHMARK_VERSION, seed, options) or build and save it."""
    path = benchmark_cache_path(model_id, seed, cache_dir, **build_options)
    if path.is_file():
        try:
            return FactBenchmark.load(path)
        except RetainFirstError:
            pass  # stale or damaged cache: rebuild below and overwrite it
    bench = build_fact_benchmark(model, tokenizer, seed=seed, model_name=model_id, **build_options)
    bench.save(path)
    return bench
