"""Probe and passage templates: placeholder filling, their validation, and each fact's probes."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from retainfirst.benchmarks.facts.schema import (
    ATTACK_KINDS,
    LEVELS,
    AdversarialTemplate,
    Fact,
    FactTemplates,
    text_field,
)
from retainfirst.data.probes import Probe
from retainfirst.errors import RetainFirstError

SUBJECT_MARKS = ("{subject}", "{Subject}")
OBJECT_MARKS = ("{object}", "{Object}")
BLANK = "___"


def fill(template: str, fact: Fact) -> str:
    """Substitute ``{subject}``/``{Subject}``/``{object}``/``{Object}`` (capitalised first letter)."""
    return (
        template.replace("{Subject}", _capitalize(fact.subject))
        .replace("{subject}", fact.subject)
        .replace("{Object}", _capitalize(fact.object))
        .replace("{object}", fact.object)
    )


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _check_marks(template: str, where: str, need_subject: bool, need_object: bool, need_blank: bool) -> None:
    has_subject = any(mark in template for mark in SUBJECT_MARKS)
    has_object = any(mark in template for mark in OBJECT_MARKS)
    if need_subject and not has_subject:
        raise RetainFirstError(f"{where}: template {template!r} needs a {{subject}} placeholder")
    if need_object and not has_object:
        raise RetainFirstError(f"{where}: template {template!r} needs an {{object}} placeholder")
    if not need_object and has_object:
        raise RetainFirstError(f"{where}: probe template {template!r} must not contain the answer {{object}}")
    if need_blank and BLANK not in template:
        raise RetainFirstError(f"{where}: fill-in-the-blank template {template!r} needs a blank {BLANK!r}")
    leftover = re.sub(r"\{(subject|Subject|object|Object)\}", "", template)
    if "{" in leftover or "}" in leftover:
        raise RetainFirstError(
            f"{where}: template {template!r} has an unknown placeholder; use {{subject}}, {{Subject}}, "
            "{object} or {Object}"
        )


def _string_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise RetainFirstError(f"{where}: must be a non-empty list of strings")
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise RetainFirstError(f"{where}[{index}]: must be a non-empty string")
    return [item.strip() for item in value]


def parse_templates(data: Any, path: Path) -> FactTemplates:
    """Validate the ``templates`` object of a family file (placeholders each level needs)."""
    if not isinstance(data, dict):
        raise RetainFirstError(f"{path}: field 'templates' must be an object with fb, qa, aa, passage")
    fb = _string_list(data.get("fb"), f"{path}: templates.fb")
    qa = _string_list(data.get("qa"), f"{path}: templates.qa")
    passage = _string_list(data.get("passage"), f"{path}: templates.passage")
    for index, text in enumerate(fb):
        _check_marks(text, f"{path}: templates.fb[{index}]", True, False, True)
    for index, text in enumerate(qa):
        _check_marks(text, f"{path}: templates.qa[{index}]", True, False, False)
    for index, text in enumerate(passage):
        _check_marks(text, f"{path}: templates.passage[{index}]", True, True, False)
    raw_aa = data.get("aa")
    if not isinstance(raw_aa, list) or not raw_aa:
        raise RetainFirstError(f"{path}: templates.aa must be a non-empty list of {{kind, text}} objects")
    aa = []
    for index, record in enumerate(raw_aa):
        where = f"{path}: templates.aa[{index}]"
        kind = text_field(record, "kind", where)
        if kind not in ATTACK_KINDS:
            raise RetainFirstError(f"{where}: kind {kind!r} is not one of {', '.join(ATTACK_KINDS)}")
        text = text_field(record, "text", where)
        _check_marks(text, where, True, False, False)
        aa.append(AdversarialTemplate(kind=kind, text=text))
    return FactTemplates(fb=tuple(fb), qa=tuple(qa), aa=tuple(aa), passage=tuple(passage))


def fact_probes(fact: Fact, templates: FactTemplates, seed: int) -> dict[str, Probe]:
    """The FB/QA/AA probes of ``fact``: one template per level, chosen by a per-fact seeded draw.

    The draw depends only on (seed, family, subject), so the filter and the final benchmark see the
    same probe for a fact, whatever else is in the candidate list.
    """
    rng = random.Random(f"{seed}:{fact.family}:{fact.subject}:probes")
    fb = rng.choice(templates.fb)
    qa = rng.choice(templates.qa)
    aa = rng.choice(templates.aa)
    return {
        "fb": Probe(prompt=fill(fb, fact), answer=fact.object, level=LEVELS["fb"], target=fact.subject),
        "qa": Probe(prompt=fill(qa, fact), answer=fact.object, level=LEVELS["qa"], target=fact.subject),
        "aa": Probe(
            prompt=fill(aa.text, fact),
            answer=fact.object,
            level=LEVELS["aa"],
            target=fact.subject,
            kind=aa.kind,
        ),
    }


# Probes per fact and level in the built benchmark: the filter's probe plus paraphrases, so each
# reported set of 16 facts has >= 50 probes (one probe moves a pooled number by at most 2 points).
PROBES_PER_LEVEL = {"fb": 2, "qa": 2, "aa": 1}


def paraphrase_probes(fact: Fact, templates: FactTemplates, seed: int, level: str, count: int) -> list[Probe]:
    """``count`` probes of ``level`` from distinct templates (fewer when the family has fewer).

    The first is :func:`fact_probes`' probe (the one the knowledge filter scored); the others are
    the remaining templates in a per-fact seeded order.
    """
    primary = fact_probes(fact, templates, seed)[level]
    if level == "aa":
        pool = [(t.text, t.kind) for t in templates.aa]
    else:
        pool = [(t, "") for t in (templates.fb if level == "fb" else templates.qa)]
    others = [(text, kind) for text, kind in pool if fill(text, fact) != primary.prompt]
    random.Random(f"{seed}:{fact.family}:{fact.subject}:{level}:paraphrases").shuffle(others)
    probes = [primary]
    for text, kind in others[: max(count - 1, 0)]:
        probes.append(
            Probe(
                prompt=fill(text, fact),
                answer=fact.object,
                level=LEVELS[level],
                target=fact.subject,
                kind=kind,
            )
        )
    return probes
