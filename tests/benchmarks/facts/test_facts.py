"""The bundled facts benchmark: data validation, split/corpus/probe invariants, determinism, caching."""

from __future__ import annotations

import json
from collections import Counter

import pytest

import retainfirst.benchmarks.facts as facts_module
from retainfirst.benchmarks.facts import (
    BENCHMARK_VERSION,
    PROBE_SETS,
    Fact,
    FactBenchmark,
    FactFamily,
    GreedyKnowledgeFilter,
    build_fact_benchmark,
    fact_probes,
    filter_known_facts,
    load_capitals_family,
    load_families,
    load_family_file,
    load_general_texts,
    load_or_build_fact_benchmark,
    mentions,
    normalize_words,
    split_facts,
)
from retainfirst.benchmarks.facts import build as build_module
from retainfirst.errors import RetainFirstError


@pytest.fixture(scope="module")
def families():
    return load_families()


@pytest.fixture(scope="module")
def known(families):
    """Every third candidate of every family: a fixed, model-free 'known' set."""
    return [fact.key for family in families for fact in family.facts[::3]]


@pytest.fixture(scope="module")
def bench(known):
    return build_fact_benchmark(None, None, seed=0, known_facts=known)


def _phrases(text: str, longest: int = 10) -> set[tuple[str, ...]]:
    """Every normalised word n-gram of ``text``: fast whole-word "mentions" checks over a corpus."""
    words = normalize_words(text)
    return {words[i : i + n] for n in range(1, longest + 1) for i in range(len(words) - n + 1)}


def _without_timing(bench: FactBenchmark) -> dict:
    data = bench.to_dict()
    data["stats"].pop("build_seconds")
    return data


# ----------------------------------------------------------------------------------------------
# Bundled data


def test_bundled_families_are_large_clean_and_have_usable_templates(families):
    names = [family.name for family in families]
    assert names == ["capital", "language", "currency", "element_symbol", "landmark_city", "book_author"]
    for family in families:
        assert len(family.facts) >= 60, family.name
        subjects = [fact.subject.casefold() for fact in family.facts]
        assert len(subjects) == len(set(subjects)), f"duplicate subject in {family.name}"
        assert all(fact.subject and fact.object for fact in family.facts)
        fact = family.facts[0]
        t = family.templates
        assert len(t.fb) >= 2 and len(t.qa) >= 2 and len(t.aa) >= 4 and len(t.passage) >= 5
        for template in (*t.fb, *t.qa, *(a.text for a in t.aa)):
            text = facts_module.fill(template, fact)
            assert fact.subject in text or fact.subject[:1].upper() + fact.subject[1:] in text
            assert "{" not in text
        assert all("___" in template for template in t.fb)
        for template in t.passage:
            text = facts_module.fill(template, fact)
            assert mentions(text, fact.object) and mentions(text, fact.subject), template


def test_capitals_come_from_the_package_with_common_names_and_fixes():
    family, dropped = load_capitals_family()
    capital_of = {fact.subject: fact.object for fact in family.facts}
    assert capital_of["Russia"] == "Moscow"  # not "Russian Federation"
    assert capital_of["South Korea"] == "Seoul"  # pycountry common_name
    assert capital_of["Brazil"] == "Brasília"  # trailing space in the source stripped
    assert capital_of["Kazakhstan"] == "Astana"  # outdated "Nur-Sultan" overridden
    assert capital_of["the Democratic Republic of the Congo"] == "Kinshasa"
    assert "Israel" not in capital_of and dropped["ISR"]  # excluded as disputed
    assert "Mexico" not in capital_of and dropped["MEX"] == "capital repeats the country name"
    assert not any("," in subject for subject in capital_of)
    assert len(family.facts) >= 150


def test_country_subjects_use_the_capital_family_names(families):
    """Country facts of several families must share the subject string to form one entity."""
    overrides = json.loads(facts_module.bundled_path("country_capitals.json").read_text(encoding="utf-8"))
    codes = json.loads(facts_module.country_capitals_json().read_text(encoding="utf-8"))
    countries = {facts_module.country_name(code, overrides["name_overrides"]) for code in codes}
    by_name = {family.name: family for family in families}
    for name in ("language", "currency"):
        others = {fact.subject for fact in by_name[name].facts}
        assert others <= countries, sorted(others - countries)


def test_general_texts_are_held_out_from_the_facts(families):
    texts = load_general_texts()
    assert 30 <= len(texts) <= 60
    phrases = _phrases("\n".join(texts))
    for family in families:
        for fact in family.facts:
            assert normalize_words(fact.subject) not in phrases, (family.name, fact.subject)
            if family.name in {"capital", "landmark_city", "book_author"}:
                assert normalize_words(fact.object) not in phrases, (family.name, fact.object)


def _write_family(tmp_path, **changes):
    data = json.loads(facts_module.bundled_path("element_symbol.json").read_text(encoding="utf-8"))
    data["facts"] = data["facts"][:3]
    for key, value in changes.items():
        data[key] = value
    path = tmp_path / "family.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path, data


def test_malformed_family_files_name_file_record_and_field(tmp_path):
    path, data = _write_family(tmp_path)
    assert len(load_family_file(path).facts) == 3

    facts = [dict(f) for f in data["facts"]]
    facts[1]["object"] = " "
    path, _ = _write_family(tmp_path, facts=facts)
    with pytest.raises(RetainFirstError, match=r"family\.json: record 1: field 'object'"):
        load_family_file(path)

    facts = [dict(f) for f in data["facts"]] + [
        {"subject": data["facts"][0]["subject"].upper(), "object": "X"}
    ]
    path, _ = _write_family(tmp_path, facts=facts)
    with pytest.raises(RetainFirstError, match=r"record 3: field 'subject' .* duplicates record 0"):
        load_family_file(path)

    templates = dict(data["templates"], qa=["What is the symbol?"])
    path, _ = _write_family(tmp_path, templates=templates)
    with pytest.raises(RetainFirstError, match=r"templates\.qa\[0\].*\{subject\}"):
        load_family_file(path)

    templates = dict(data["templates"], fb=["The symbol of {subject} is {object}."])
    path, _ = _write_family(tmp_path, templates=templates)
    with pytest.raises(RetainFirstError, match=r"templates\.fb\[0\].*must not contain the answer"):
        load_family_file(path)

    templates = dict(data["templates"], passage=["{Subject} is an element."])
    path, _ = _write_family(tmp_path, templates=templates)
    with pytest.raises(RetainFirstError, match=r"templates\.passage\[0\].*\{object\}"):
        load_family_file(path)

    templates = dict(data["templates"], aa=[{"kind": "jailbreak", "text": "Tell me about {subject}."}])
    path, _ = _write_family(tmp_path, templates=templates)
    with pytest.raises(RetainFirstError, match=r"templates\.aa\[0\]: kind 'jailbreak'"):
        load_family_file(path)

    facts = [{"subject": "Mexico", "object": "Mexico City"}]
    path, _ = _write_family(tmp_path, facts=facts)
    with pytest.raises(RetainFirstError, match=r"record 0: field 'object' 'Mexico City'"):
        load_family_file(path)

    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(RetainFirstError, match=r"family\.json: invalid JSON"):
        load_family_file(path)


# ----------------------------------------------------------------------------------------------
# Split, corpora and probes (model-free: known_facts override)


def test_benchmark_shape_and_probe_levels(bench):
    assert bench.stats["version"] == BENCHMARK_VERSION
    assert set(bench.probes) == set(PROBE_SETS)
    assert len(bench.forget_facts) == 40 and len(bench.neighbor_facts) == 40
    for name in PROBE_SETS:
        side = bench.forget_facts if name.startswith("forget") else bench.neighbor_facts
        probes = bench.probes[name]
        assert [(p.target, p.answer) for p in probes] == [(f.subject, f.object) for f in side]
        level = {"fb": "1", "qa": "2", "aa": "3"}[name.split("_")[1]]
        assert {p.level for p in probes} == {level}
        for probe in probes:
            assert not mentions(probe.prompt, probe.answer), probe
    assert all("___" in p.prompt for p in bench.probes["forget_fb"])
    assert all(p.kind for p in bench.probes["forget_aa"])
    assert len(bench.forget_corpus) >= 5 * 40 and len(bench.retain_corpus) >= 5 * 40
    assert len(bench.general_texts) >= 30
    assert bench.mmlu_subset_spec.size == 100


def test_split_is_disjoint_and_every_family_on_both_sides(bench):
    forget_subjects = {f.subject for f in bench.forget_facts}
    neighbor_subjects = {f.subject for f in bench.neighbor_facts}
    assert not forget_subjects & neighbor_subjects
    families = {f.family for f in bench.forget_facts}
    assert families == {f.family for f in bench.neighbor_facts}
    assert len(families) == 6
    counts = Counter(f.family for f in bench.forget_facts)
    assert max(counts.values()) - min(counts.values()) <= 1  # balanced over families
    # some forget targets carry several facts (a country's capital, language and currency)
    assert any(n >= 2 for n in Counter(f.subject for f in bench.forget_facts).values())


def test_forget_corpus_covers_forget_facts_and_never_names_neighbour_answers(bench):
    forget_text = _phrases("\n".join(bench.forget_corpus))
    retain_text = _phrases("\n".join(bench.retain_corpus))
    for fact in bench.forget_facts:
        assert normalize_words(fact.object) in forget_text and normalize_words(fact.subject) in forget_text
    for fact in bench.neighbor_facts:
        assert normalize_words(fact.object) not in forget_text, fact
        assert normalize_words(fact.subject) not in forget_text, fact
        assert normalize_words(fact.object) in retain_text
    for fact in bench.forget_facts:
        assert normalize_words(fact.object) not in retain_text, fact
    # passages mixing two or more facts of one target entity
    multi = [s for s, n in Counter(f.subject for f in bench.forget_facts).items() if n >= 2]
    entity = multi[0]
    objects = [f.object for f in bench.forget_facts if f.subject == entity]
    assert any(all(mentions(p, o) for o in objects) for p in bench.forget_corpus)


def test_same_seed_same_benchmark_other_seed_other_split(known, bench):
    again = build_fact_benchmark(None, None, seed=0, known_facts=known)
    assert _without_timing(again) == _without_timing(bench)
    other = build_fact_benchmark(None, None, seed=1, known_facts=known)
    assert {f.subject for f in other.forget_facts} != {f.subject for f in bench.forget_facts}
    assert other.forget_corpus != bench.forget_corpus


def test_sizes_are_configurable(known):
    small = build_fact_benchmark(None, None, seed=3, n_forget=12, n_retain=7, known_facts=known)
    assert len(small.forget_facts) == 12 and len(small.neighbor_facts) == 7
    assert len(small.probes["forget_aa"]) == 12 and len(small.probes["neighbor_qa"]) == 7
    with pytest.raises(RetainFirstError, match="n_forget and n_retain"):
        build_fact_benchmark(None, None, n_forget=0, known_facts=known)


def test_filter_tests_qa_then_fb_and_stops_when_a_family_has_enough(families):
    calls = []

    def qa_for_all_fb_for_metals(facts, probes):
        calls.append({p.level for p in probes})
        if probes and probes[0].level == "2":
            return [True] * len(probes)
        return [f.family != "element_symbol" or f.object in {"Fe", "Cu", "Au", "Ag"} for f in facts]

    kept, counts = filter_known_facts(
        families, qa_for_all_fb_for_metals, seed=0, needed_per_family=5, levels=("qa", "fb"), chunk_size=8
    )
    assert calls[0] == {"2"} and calls[1] == {"1"}
    assert counts["capital"] == {"candidates": len(families[0].facts), "tested": 8, "kept": 8}
    assert counts["element_symbol"]["tested"] == len(families[3].facts)  # never reached 5: tested all
    assert {f.object for f in kept if f.family == "element_symbol"} == {"Fe", "Cu", "Au", "Ag"}


def test_filter_caps_the_candidates_tested_per_family(families):
    def knows_nothing(facts, probes):
        return [False] * len(probes)

    kept, counts = filter_known_facts(
        families, knows_nothing, seed=0, needed_per_family=5, chunk_size=4, max_tested_per_family=7
    )
    assert kept == []
    assert all(c["tested"] == 7 for c in counts.values())
    with pytest.raises(RetainFirstError, match="filter levels"):
        filter_known_facts(families, knows_nothing, seed=0, needed_per_family=5, levels=("blank",))


def test_empty_or_tiny_known_set_is_a_clear_error():
    with pytest.raises(RetainFirstError, match="answered none of the candidate facts"):
        split_facts([], 10, 10, seed=0)
    with pytest.raises(RetainFirstError, match="only 1 known entity"):
        split_facts([Fact("capital", "France", "Paris")], 10, 10, seed=0)


def test_greedy_filter_scores_like_the_evaluation(monkeypatch, families):
    """Kept = ROUGE-L recall 1 of the gold answer in the greedy answer (rwku tokenisation, case-sensitive)."""
    import retainfirst.evals.generation as generation

    answers = ["The chemical symbol of hydrogen is H.", "It is Li (lithium)", "Symbol: C", ""]
    monkeypatch.setattr(generation, "generate_greedy", lambda *args, **kwargs: answers)

    class NoTemplate:
        chat_template = None

    facts = families[3].facts[:4]
    assert [f.object for f in facts] == ["H", "Li", "B", "C"]
    probes = [fact_probes(f, families[3].templates, 0)["qa"] for f in facts]
    greedy = GreedyKnowledgeFilter(None, NoTemplate())  # rouge_score words: "(lithium)" is fine
    assert greedy(facts, probes) == [True, True, False, False]
    strict = GreedyKnowledgeFilter(None, NoTemplate(), rouge_tokenization="rwku")  # RWKU: "H," != "H"
    answers[0] = "The chemical symbol of hydrogen is H, as in water."
    assert strict(facts, probes) == [False, True, False, False]


def test_random_tiny_model_knows_nothing(tiny_model, byte_tokenizer, families):
    """The real greedy filter, end to end, on a random model: nothing kept -> a clear error."""
    family = families[3]
    small = FactFamily(family.name, family.relation, family.source, family.templates, family.facts[:3])
    greedy = GreedyKnowledgeFilter(tiny_model, byte_tokenizer, batch_size=4, max_new_tokens=3)
    assert greedy.prompt_format == "raw"  # byte tokenizer: no chat template
    with pytest.raises(RetainFirstError, match="answered none"):
        build_fact_benchmark(None, None, families=[small], knowledge_filter=greedy)


# ----------------------------------------------------------------------------------------------
# Saving, loading and the cache


def test_save_load_roundtrip_is_atomic_and_versioned(tmp_path, bench):
    path = bench.save(tmp_path / "sub" / "bench.json")
    assert [p.name for p in path.parent.iterdir()] == ["bench.json"]  # no temp file left behind
    loaded = FactBenchmark.load(path)
    assert loaded.to_dict() == bench.to_dict()
    assert loaded.probes["forget_aa"][0] == bench.probes["forget_aa"][0]

    data = json.loads(path.read_text(encoding="utf-8"))
    data["version"] = "facts-0"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(RetainFirstError, match=r"version 'facts-0'.*rebuild"):
        FactBenchmark.load(path)
    data["version"] = BENCHMARK_VERSION
    del data["probes"]["neighbor_qa"]
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(RetainFirstError, match="malformed facts benchmark"):
        FactBenchmark.load(path)


def test_load_or_build_builds_once_per_model_and_seed(tmp_path, known, monkeypatch):
    first = load_or_build_fact_benchmark(
        None, None, "smollm2-135m", seed=2, cache_dir=tmp_path, known_facts=known
    )
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and BENCHMARK_VERSION in files[0].name and "seed2" in files[0].name
    assert first.stats["model"] == "smollm2-135m"

    def no_build(*args, **kwargs):
        raise AssertionError("should have loaded the cache")

    monkeypatch.setattr(build_module, "build_fact_benchmark", no_build)
    second = load_or_build_fact_benchmark(
        None, None, "smollm2-135m", seed=2, cache_dir=tmp_path, known_facts=known
    )
    assert second.to_dict() == first.to_dict()
    with pytest.raises(AssertionError):  # another seed is another cache entry
        load_or_build_fact_benchmark(
            None, None, "smollm2-135m", seed=3, cache_dir=tmp_path, known_facts=known
        )


def test_mmlu_subset_spec_draws_per_subject(bench):
    spec = bench.mmlu_subset_spec
    questions = spec.load()
    assert len(questions) == spec.size == 100
    assert Counter(q.subject for q in questions) == dict.fromkeys(spec.subjects, 5)
    assert [q.question for q in spec.load()] == [q.question for q in questions]


# ----------------------------------------------------------------------------------------------
# The real model


@pytest.mark.slow
def test_smollm2_knows_the_kept_facts(smollm2):
    from retainfirst.evals.generation import evaluate_generation

    model, tokenizer = smollm2
    bench = build_fact_benchmark(
        model, tokenizer, seed=0, n_forget=12, n_retain=12, model_name="smollm2-135m"
    )
    assert bench.stats["prompt_format"] == "chat"
    for name, counts in bench.stats["families"].items():
        assert counts["kept"] >= 3, (name, counts)
        assert counts["forget"] >= 1 and counts["neighbor"] >= 1, (name, counts)
    assert len(bench.forget_facts) == 12 and len(bench.neighbor_facts) == 12
    settings = bench.eval_settings
    assert settings == {"prompt_format": "chat", "rouge_tokenization": "rouge_score", "max_new_tokens": 16}
    for name in ("forget_qa", "neighbor_qa"):
        result = evaluate_generation(
            model, tokenizer, bench.probes[name], task=name, batch_size=12, **settings
        )
        assert result.metrics["rougeL_recall"] >= 0.9, result.samples
