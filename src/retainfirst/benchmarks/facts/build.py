"""Building the benchmark for a model (filter, split, corpora, probes) and caching it per model."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from retainfirst import models
from retainfirst.benchmarks.facts.benchmark import BENCHMARK_VERSION, FactBenchmark
from retainfirst.benchmarks.facts.corpus import MMLUSubsetSpec, load_general_texts, make_corpus
from retainfirst.benchmarks.facts.families import load_families
from retainfirst.benchmarks.facts.general import general_probe, load_general_questions
from retainfirst.benchmarks.facts.knowledge_filter import (
    GreedyKnowledgeFilter,
    KnowledgeFilter,
    filter_general_questions,
    filter_known_facts,
    known_facts_filter,
)
from retainfirst.benchmarks.facts.names import NamedIn
from retainfirst.benchmarks.facts.schema import LEVELS, PROBE_SETS, Fact, FactFamily
from retainfirst.benchmarks.facts.split import overlaps, split_facts
from retainfirst.benchmarks.facts.templates import PROBES_PER_LEVEL, paraphrase_probes
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
    n_heldout: int | None = None,
    n_general: int | None = None,
    probes_per_level: Mapping[str, int] | None = None,
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
    general_questions: Sequence[Fact] | None = None,
    mmlu_per_subject: int = 5,
    model_name: str | None = None,
) -> FactBenchmark:
    """Build the benchmark for ``model``: filter known facts, split three ways, write corpora and probes.

    ``n_heldout`` held-out facts (None: as many as ``n_retain``) and up to ``n_general`` known
    general-knowledge questions (None: all; 0: none) measure utility; see :mod:`.split` and
    :mod:`.general`. ``probes_per_level`` ({"fb", "qa", "aa"} -> count, default
    ``PROBES_PER_LEVEL``) sets how many paraphrase probes each fact gets.
    ``known_facts`` (family, subject pairs; general questions as ("general:<category>", question))
    or ``knowledge_filter`` replace the greedy check (tests, other models). ``filter_levels`` are
    the probe levels a fact must pass ("qa" by default; add "fb" for a stricter, slower filter).
    Without ``exhaustive`` each family stops once it has ``needed = ceil(filter_slack * (n_forget +
    n_retain + n_heldout) / n_families)`` kept facts or has tested ``max_tested_factor * needed``
    candidates; every general question is tested (one generation each).
    """
    n_heldout = n_retain if n_heldout is None else n_heldout
    if n_forget < 1 or n_retain < 1 or n_heldout < 1:
        raise RetainFirstError(
            f"n_forget, n_retain and n_heldout must be >= 1, got {n_forget}, {n_retain} and {n_heldout}"
        )
    if n_general is not None and n_general < 0:
        raise RetainFirstError(f"n_general must be >= 0 or None (all known questions), got {n_general}")
    per_level = {**PROBES_PER_LEVEL, **(probes_per_level or {})}
    if set(per_level) != set(LEVELS) or any(int(n) < 1 for n in per_level.values()):
        raise RetainFirstError(f"probes_per_level {dict(per_level)!r} must map fb, qa and aa to counts >= 1")
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
    total = n_forget + n_retain + n_heldout
    needed = None if exhaustive else math.ceil(filter_slack * total / len(families))
    max_tested = None if needed is None else math.ceil(max_tested_factor * needed)
    kept, counts = filter_known_facts(
        families, knowledge_filter, seed, needed, filter_levels, batch_size, max_tested
    )
    forget, retain, heldout = split_facts(kept, n_forget, n_retain, seed, n_heldout)

    templates_of = {family.name: family.templates for family in families}
    forget_corpus = make_corpus(forget, templates_of, seed, passages_per_fact, mixed_per_entity, "forget")
    retain_corpus = make_corpus(retain, templates_of, seed, passages_per_fact, mixed_per_entity, "retain")
    in_any = NamedIn(forget_corpus + retain_corpus)
    # the split keeps held-out facts out of the corpora by name; this also catches template words
    named = [f for f in heldout if in_any(f.subject) or in_any(f.object)]
    heldout = [f for f in heldout if f not in named]
    if not heldout:
        raise RetainFirstError("every held-out fact is named in a training corpus; raise n_heldout")

    candidates = list(general_questions) if general_questions is not None else load_general_questions()
    general_known = [] if n_general == 0 else filter_general_questions(candidates, knowledge_filter)
    forget_phrases = [p for f in forget for p in (f.subject, f.object)]
    touching = [q for q in general_known if in_any(q.object) or overlaps(q, forget_phrases)]
    general = [q for q in general_known if q not in touching]
    if n_general is not None and len(general) > n_general:
        chosen = set(random.Random(f"{seed}:general").sample(range(len(general)), n_general))
        general = [q for i, q in enumerate(general) if i in chosen]

    probes: dict[str, list[Probe]] = {name: [] for name in PROBE_SETS}
    for prefix, side, levels in (
        ("forget", forget, ("fb", "qa", "aa")),
        ("heldout", heldout, ("fb", "qa")),
        ("retain_fit", retain, ("fb", "qa")),
    ):
        for fact in side:
            for level in levels:
                made = paraphrase_probes(fact, templates_of[fact.family], seed, level, per_level[level])
                probes[f"{prefix}_{level}"].extend(made)
    probes["general_qa"] = [general_probe(q) for q in general]

    for name, family_counts in counts.items():
        family_counts["forget"] = sum(f.family == name for f in forget)
        family_counts["retain"] = sum(f.family == name for f in retain)
        family_counts["heldout"] = sum(f.family == name for f in heldout)
    stats: dict[str, Any] = {
        "version": BENCHMARK_VERSION,
        "seed": seed,
        "model": model_name or _model_name(model),
        "n_forget": len(forget),
        "n_retain": len(retain),
        "n_heldout": len(heldout),
        "n_general": len(general),
        "n_forget_requested": n_forget,
        "n_retain_requested": n_retain,
        "n_heldout_requested": n_heldout,
        "n_general_requested": n_general,
        "forget_targets": len({f.subject for f in forget}),
        "retain_targets": len({f.subject for f in retain}),
        "heldout_targets": len({f.subject for f in heldout}),
        "heldout_dropped_named_in_corpus": len(named),
        "families": counts,
        "general": {
            "candidates": len(candidates),
            "tested": 0 if n_general == 0 else len(candidates),
            "known": len(general_known),
            "dropped_touching_corpus_or_forget": len(touching),
            "kept": len(general),
        },
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
        "probes_per_level": dict(per_level),
        "probes": {name: len(items) for name, items in probes.items()},
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    return FactBenchmark(
        forget_corpus=forget_corpus,
        retain_corpus=retain_corpus,
        probes=probes,
        general_texts=load_general_texts(),
        forget_facts=forget,
        retain_facts=retain,
        heldout_facts=heldout,
        general_facts=general,
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


PREBUILT_DIR = Path(__file__).parent / "bundled" / "prebuilt"


def prebuilt_benchmark_path(model_id: str, file_name: str) -> Path | None:
    """The shipped benchmark of an embedded model (the demo's build options), or None.

    Building filters every candidate fact through the model (minutes on a CPU); for the embedded
    model that build is deterministic, so it ships with the package and a first demo starts at
    once. A slow test rebuilds it from the model and checks that it is identical.
    """
    if model_id not in models.EMBEDDED_ALIASES:
        return None
    return PREBUILT_DIR / file_name


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
    for candidate in (path, prebuilt_benchmark_path(model_id, path.name)):
        if candidate is not None and candidate.is_file():
            try:
                bench = FactBenchmark.load(candidate)
            except RetainFirstError:
                continue  # stale or damaged: try the next one, else rebuild below and overwrite it
            if candidate != path:
                bench.save(path)
            return bench
    bench = build_fact_benchmark(model, tokenizer, seed=seed, model_name=model_id, **build_options)
    bench.save(path)
    return bench
