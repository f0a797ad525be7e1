"""TOFU (locuslab/TOFU, Maini et al. 2024) from a local copy of the Hugging Face dataset.

Each dataset config is one file or folder under ``folder``, named after the config as on the hub:

* ``<config>.json``: the hub's main branch (JSON Lines despite the suffix; a JSON array also works),
* ``<config>.jsonl``,
* ``<config>/**/*.parquet``: the hub's parquet conversion (``<config>/train/0000.parquet``) or a
  ``datasets`` export (``<config>/train-00000-of-00001.parquet``); files are read in name order.

Configs: ``forget01/05/10`` and ``retain90/95/99`` (``question``, ``answer``: the training pairs),
``forget01/05/10_perturbed`` and ``retain_perturbed`` (also ``paraphrased_answer`` and
``perturbed_answer``, a list), ``real_authors_perturbed`` and ``world_facts_perturbed``
(``question``, ``answer``, ``perturbed_answer``). The evaluation reads the ``_perturbed`` configs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retainfirst.data.corpora import read_records, require_field, require_text
from retainfirst.errors import RetainFirstError

FORGET_SPLITS = ("forget01", "forget05", "forget10")
RETAIN_OF_FORGET = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
EVAL_SETS = ("forget", "retain", "real_authors", "world_facts")
# Prompt formats of TOFU's config/model_config.yaml: (question_start, question_end, answer_start).
TEMPLATES = {
    "llama2": ("[INST] ", " [/INST]", ""),
    "qa": ("Question: ", "\n", "Answer: "),  # phi, stablelm, pythia
}


@dataclass(frozen=True)
class TofuItem:
    """One evaluation question. ``paraphrased_answer`` is None for real authors / world facts, where
    the truth ratio compares the answer itself with the perturbed answers (as in TOFU)."""

    question: str
    answer: str
    perturbed_answers: tuple[str, ...] = ()
    paraphrased_answer: str | None = None

    @property
    def base_answer(self) -> str:
        """The answer the truth ratio compares with the perturbed ones (TOFU's ``base_answer_key``)."""
        return self.paraphrased_answer if self.paraphrased_answer is not None else self.answer


@dataclass
class TofuData:
    """The four evaluation sets of one forget split (``forget``, ``retain``, ``real_authors``,
    ``world_facts``), each a list of :class:`TofuItem` in file order."""

    split: str
    sets: dict[str, list[TofuItem]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {name: len(items) for name, items in self.sets.items()}


def config_path(folder: str | Path, config: str) -> list[Path]:
    """The file(s) holding dataset config ``config`` under ``folder`` (see the module docstring)."""
    root = Path(folder)
    for suffix in (".json", ".jsonl"):
        candidate = root / f"{config}{suffix}"
        if candidate.is_file():
            return [candidate]
    sub = root / config
    if sub.is_dir():
        parquet = sorted(sub.rglob("*.parquet"))
        if parquet:
            return parquet
    raise RetainFirstError(
        f"{root}: no TOFU config {config!r}; expected {config}.json, {config}.jsonl or {config}/*.parquet"
    )


def read_json_or_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Records of a ``.json`` file holding either one JSON array or JSON Lines (the TOFU hub files)."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from read_records(path)
        return
    seen = False
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RetainFirstError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise RetainFirstError(f"{path}: line {number} is a {type(record).__name__}, expected an object")
        seen = True
        yield number, record
    if not seen:
        raise RetainFirstError(f"{path}: file is empty")


def read_config(folder: str | Path, config: str) -> list[tuple[Path, int, dict[str, Any]]]:
    """All records of one dataset config, with the file and record number for error messages."""
    out = []
    for path in config_path(folder, config):
        records = read_json_or_lines(path) if path.suffix == ".json" else read_records(path)
        out.extend((path, number, record) for number, record in records)
    return out


def _item(path: Path, number: int, record: dict[str, Any], paraphrased: bool) -> TofuItem:
    question = require_text(record, "question", path, number)
    answer = require_text(record, "answer", path, number)
    perturbed = require_field(record, "perturbed_answer", path, number)
    if isinstance(perturbed, str):
        perturbed = [perturbed]
    if (
        not isinstance(perturbed, list | tuple)
        or not perturbed
        or not all(isinstance(p, str) for p in perturbed)
    ):
        raise RetainFirstError(
            f"{path}: record {number} field 'perturbed_answer' must be a non-empty list of strings"
        )
    return TofuItem(
        question=question,
        answer=answer,
        perturbed_answers=tuple(perturbed),
        paraphrased_answer=require_text(record, "paraphrased_answer", path, number) if paraphrased else None,
    )


def load_tofu(folder: str | Path, split: str = "forget10", limit: int | None = None) -> TofuData:
    """The evaluation sets of ``split`` (forget01/05/10): its ``_perturbed`` config, ``retain_perturbed``,
    ``real_authors_perturbed`` and ``world_facts_perturbed``; ``limit`` keeps the first items of each
    (TOFU's ``ds_size``)."""
    if split not in FORGET_SPLITS:
        raise RetainFirstError(f"TOFU split {split!r} is not valid; choose one of {', '.join(FORGET_SPLITS)}")
    configs = {
        "forget": (f"{split}_perturbed", True),
        "retain": ("retain_perturbed", True),
        "real_authors": ("real_authors_perturbed", False),
        "world_facts": ("world_facts_perturbed", False),
    }
    data = TofuData(split=split)
    for name, (config, paraphrased) in configs.items():
        records = read_config(folder, config)
        items = [_item(path, number, record, paraphrased) for path, number, record in records]
        data.sets[name] = items[:limit] if limit else items
    return data


def load_tofu_pairs(folder: str | Path, config: str) -> list[tuple[str, str]]:
    """(question, answer) pairs of a training config (``forget10``, ``retain90``, ...)."""
    return [
        (require_text(r, "question", p, n), require_text(r, "answer", p, n))
        for p, n, r in read_config(folder, config)
    ]


def format_question(question: str, template: str = "llama2") -> str:
    """The prompt TOFU builds for ``question`` (question tags, then the answer tag)."""
    if template not in TEMPLATES:
        raise RetainFirstError(
            f"TOFU template {template!r} is not valid; choose one of {', '.join(TEMPLATES)}"
        )
    start, end, answer_start = TEMPLATES[template]
    return f"{start}{question}{end}{answer_start}"


def tofu_training_pairs(
    folder: str | Path, split: str = "forget10", template: str = "llama2"
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(prompt, answer) pairs of the forget split and its retain split (forget10 -> retain90), with the
    prompt formatted as TOFU's fine-tuning and unlearning did; feed them to ``tokenize_pairs``."""
    if split not in RETAIN_OF_FORGET:
        raise RetainFirstError(f"TOFU split {split!r} is not valid; choose one of {', '.join(FORGET_SPLITS)}")
    forget, retain = (load_tofu_pairs(folder, c) for c in (split, RETAIN_OF_FORGET[split]))
    return (
        [(format_question(q, template), a) for q, a in forget],
        [(format_question(q, template), a) for q, a in retain],
    )
