"""Records of the facts benchmark: facts, relation families and their templates, probe levels.

Also the two JSON primitives every loader of the benchmark's files shares (read a file, read a
required text field), so each error names the file, the record and the field to fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retainfirst.errors import RetainFirstError

# forget_*: the forget facts (their passages are the forget corpus); retain_fit_*: the retain facts
# (their passages are the retain corpus: a fit diagnostic, not utility); heldout_*: facts of the same
# families in no corpus (the primary utility); general_qa: general-knowledge questions (collateral).
PROBE_SETS = (
    "forget_fb",
    "forget_qa",
    "forget_aa",
    "heldout_fb",
    "heldout_qa",
    "general_qa",
    "retain_fit_fb",
    "retain_fit_qa",
)
LEVELS = {"fb": "1", "qa": "2", "aa": "3"}
# RWKU's nine level-3 attack types (Probe.kind); the evaluation formats two of them specially.
ATTACK_KINDS = (
    "prefix injection",
    "affirmative suffix",
    "role play",
    "multiple choice",
    "reverse query",
    "synonym manipulation",
    "background hint",
    "incontext learning",
    "cross lingual",
)


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple; ``family`` names the relation family it belongs to."""

    family: str
    subject: str
    object: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.family, self.subject)


@dataclass(frozen=True)
class AdversarialTemplate:
    """A level-3 probe template and its RWKU attack type."""

    kind: str
    text: str


@dataclass(frozen=True)
class FactTemplates:
    """Paraphrase templates of one relation: probes per level and training passages."""

    fb: tuple[str, ...]
    qa: tuple[str, ...]
    aa: tuple[AdversarialTemplate, ...]
    passage: tuple[str, ...]


@dataclass(frozen=True)
class FactFamily:
    """A relation family: its templates and candidate facts (not yet filtered by the model)."""

    name: str
    relation: str
    source: str
    templates: FactTemplates
    facts: tuple[Fact, ...]


def read_json(path: Path) -> Any:
    """The parsed JSON of ``path``; a missing or invalid file is a one-line user error."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RetainFirstError(f"{path}: bundled data file is missing; reinstall retainfirst") from exc
    except json.JSONDecodeError as exc:
        raise RetainFirstError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc


def text_field(record: Any, field_name: str, where: str) -> str:
    """``record[field_name]`` as a stripped non-empty string, else an error naming ``where``."""
    if not isinstance(record, dict):
        raise RetainFirstError(f"{where}: expected an object with field {field_name!r}")
    value = record.get(field_name)
    if not isinstance(value, str) or not value.strip():
        raise RetainFirstError(f"{where}: field {field_name!r} must be a non-empty string")
    return value.strip()
