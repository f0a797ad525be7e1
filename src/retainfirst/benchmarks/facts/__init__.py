"""The bundled offline benchmark: RWKU-shaped unlearning on facts the model really knows.

Why: RWKU needs a large model and a download; this benchmark runs offline on the embedded
SmolLM2-135M-Instruct in seconds. Facts (subject, relation, object) come from several relation
families: country -> capital from the public-domain ``country-capitals`` package, and families the
project ships as JSON in ``bundled/`` (chemical symbols, landmark cities, book authors, main
languages, currencies). Each family carries templates for the three RWKU probe levels
(fill-in-the-blank, question, adversarial) and for training passages.

Build steps (:func:`build_fact_benchmark`), all deterministic from ``seed``:

1. **Knowledge filter** (:mod:`.knowledge_filter`). A fact is kept only if the model answers its
   question probe (optionally also its fill-in-the-blank probe) correctly, scored *exactly as the
   evaluation scores it* (:mod:`retainfirst.evals.generation`: RWKU instruction in the chat
   template, greedy, ROUGE-L recall of the gold answer = 1). SmolLM2-135M-Instruct answers far more
   often in this chat format than as a plain completion. Candidates are tested in a seeded order
   and a family stops once it has enough kept facts (or has tested a capped number), so the build
   stays short on CPU (``exhaustive=True`` tests all).
2. **Split** (:mod:`.split`). Kept entities (subjects) go to exactly one of three sides, balanced
   over families: forget targets, held-out facts and retain facts. Held-out and retain facts never
   name, nor are named by, a forget subject or answer; retain facts never name a held-out entity.
3. **Corpora and probes** (:mod:`.corpus`, :mod:`.templates`). Several paraphrased passages per
   fact (plus passages that mix the facts of one entity) form the forget corpus (forget facts) and
   the retain corpus (retain facts); held-out facts are in neither (checked on the text). Probes:
   ``forget_fb/qa/aa``; ``heldout_fb/qa`` (the primary utility: knowledge near the forget set that
   no loss trained on); ``retain_fit_fb/qa`` (how well the retain corpus' own facts are kept: a
   diagnostic, since the retain loss trains on them); each fact gets the filter's probe plus
   paraphrases (``PROBES_PER_LEVEL``). Probe prompts are raw queries: the evaluation adds the
   instruction and chat template (see :class:`retainfirst.data.probes.Probe`).
4. **General knowledge** (:mod:`.general`). Simple questions from no relation family ("How many
   days are in a week?"), kept when the model answers them and no corpus names the answer nor they
   a forget subject or answer: ``general_qa``, collateral damage.

Modules: ``schema`` (records, probe levels), ``names`` (whole-word name matching), ``templates``
(placeholders, probes), ``families`` (bundled data loading), ``general`` (general-knowledge
questions), ``knowledge_filter``, ``split``,
``corpus`` (corpora, held-out text, MMLU subset), ``benchmark`` (``FactBenchmark`` and its file),
``build`` (``build_fact_benchmark`` and the per-model cache). This package sits above ``data`` and
``evals``; neither imports it (see the import-linter contracts in ``pyproject.toml``).
"""

from retainfirst.benchmarks.facts.benchmark import BENCHMARK_VERSION, FactBenchmark
from retainfirst.benchmarks.facts.build import (
    benchmark_cache_path,
    build_fact_benchmark,
    load_or_build_fact_benchmark,
)
from retainfirst.benchmarks.facts.corpus import MMLU_SUBJECTS, MMLUSubsetSpec, load_general_texts, make_corpus
from retainfirst.benchmarks.facts.families import (
    bundled_path,
    country_capitals_json,
    country_name,
    load_capitals_family,
    load_families,
    load_family_file,
)
from retainfirst.benchmarks.facts.general import general_probe, is_general, load_general_questions
from retainfirst.benchmarks.facts.knowledge_filter import (
    GreedyKnowledgeFilter,
    KnowledgeFilter,
    filter_general_questions,
    filter_known_facts,
    known_facts_filter,
)
from retainfirst.benchmarks.facts.names import NamedIn, leaks_answer, mentions, normalize_words
from retainfirst.benchmarks.facts.schema import (
    ATTACK_KINDS,
    LEVELS,
    PROBE_SETS,
    AdversarialTemplate,
    Fact,
    FactFamily,
    FactTemplates,
)
from retainfirst.benchmarks.facts.split import FactSplit, split_facts
from retainfirst.benchmarks.facts.templates import (
    PROBES_PER_LEVEL,
    fact_probes,
    fill,
    paraphrase_probes,
    parse_templates,
)

__all__ = [
    "ATTACK_KINDS",
    "BENCHMARK_VERSION",
    "LEVELS",
    "MMLU_SUBJECTS",
    "PROBES_PER_LEVEL",
    "PROBE_SETS",
    "AdversarialTemplate",
    "Fact",
    "FactBenchmark",
    "FactFamily",
    "FactSplit",
    "FactTemplates",
    "GreedyKnowledgeFilter",
    "KnowledgeFilter",
    "MMLUSubsetSpec",
    "NamedIn",
    "benchmark_cache_path",
    "build_fact_benchmark",
    "bundled_path",
    "country_capitals_json",
    "country_name",
    "fact_probes",
    "fill",
    "filter_general_questions",
    "filter_known_facts",
    "general_probe",
    "is_general",
    "known_facts_filter",
    "leaks_answer",
    "load_capitals_family",
    "load_families",
    "load_family_file",
    "load_general_questions",
    "load_general_texts",
    "load_or_build_fact_benchmark",
    "make_corpus",
    "mentions",
    "normalize_words",
    "paraphrase_probes",
    "parse_templates",
    "split_facts",
]
