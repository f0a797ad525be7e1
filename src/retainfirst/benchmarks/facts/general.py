"""General-knowledge questions: collateral damage on knowledge no training corpus touches.

Why: the relation families' held-out facts share templates and answer types with the corpora, so
they measure knowledge *near* the forget set. These simple questions (days of the week, planets,
colours, animal young, opposites, basic science) come from no relation family, so a drop on them is
damage to general knowledge. The bundled file is written for retainfirst; each question is one
:class:`Fact` with family ``general:<category>``, the question as subject and the answer as object,
so the knowledge filter and ``known_facts`` treat it like any other fact.
"""

from __future__ import annotations

from pathlib import Path

from retainfirst.benchmarks.facts.families import bundled_path
from retainfirst.benchmarks.facts.names import mentions
from retainfirst.benchmarks.facts.schema import LEVELS, Fact, read_json, text_field
from retainfirst.data.probes import Probe
from retainfirst.errors import RetainFirstError

GENERAL_FILE = "general_knowledge.json"
GENERAL_PREFIX = "general:"


def is_general(fact: Fact) -> bool:
    return fact.family.startswith(GENERAL_PREFIX)


def load_general_questions(path: str | Path | None = None) -> list[Fact]:
    """The bundled questions in file order; unique questions whose text never contains the answer."""
    path = Path(path) if path else bundled_path(GENERAL_FILE)
    data = read_json(path)
    groups = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(groups, list) or not groups:
        raise RetainFirstError(
            f"{path}: field 'categories' must be a non-empty list of {{category, questions}}"
        )
    facts: list[Fact] = []
    seen: dict[str, str] = {}
    for number, group in enumerate(groups):
        where = f"{path}: categories[{number}]"
        category = text_field(group, "category", where)
        records = group.get("questions")
        if not isinstance(records, list) or not records:
            raise RetainFirstError(
                f"{where}: field 'questions' must be a non-empty list of {{question, answer}}"
            )
        for index, record in enumerate(records):
            spot = f"{where}.questions[{index}]"
            question = text_field(record, "question", spot)
            answer = text_field(record, "answer", spot)
            if question.casefold() in seen:
                raise RetainFirstError(
                    f"{spot}: question {question!r} duplicates one in {seen[question.casefold()]}"
                )
            seen[question.casefold()] = spot
            if mentions(question, answer):
                raise RetainFirstError(
                    f"{spot}: question {question!r} contains its answer {answer!r}; reword it"
                )
            facts.append(Fact(family=f"{GENERAL_PREFIX}{category}", subject=question, object=answer))
    return facts


def general_probe(fact: Fact) -> Probe:
    """The question as a level-2 (QA) probe; its target is the category ("animals")."""
    return Probe(
        prompt=fact.subject,
        answer=fact.object,
        level=LEVELS["qa"],
        target=fact.family.removeprefix(GENERAL_PREFIX),
    )
