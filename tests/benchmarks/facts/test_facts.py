"""The bundled facts benchmark: data validation, split/corpus/probe invariants, determinism, caching."""

from __future__ import annotations

import json
from collections import Counter

import pytest

import retainfirst.benchmarks.facts as facts_module
from retainfirst.benchmarks.facts import (
    BENCHMARK_VERSION,
    PROBE_SETS,
    PROBES_PER_LEVEL,
    Fact,
    FactBenchmark,
    FactFamily,
    GreedyKnowledgeFilter,
    build_fact_benchmark,
    fact_probes,
    filter_general_questions,
    filter_known_facts,
    general_probe,
    load_capitals_family,
    load_families,
    load_family_file,
    load_general_questions,
    load_general_texts,
    load_or_build_fact_benchmark,
    mentions,
    normalize_words,
    paraphrase_probes,
    split_facts,
)
from retainfirst.benchmarks.facts import build as build_module
from retainfirst.errors import RetainFirstError


@pytest.fixture(scope="module")
def families():
    return load_families()


@pytest.fixture(scope="module")
def general_questions():
    return load_general_questions()


@pytest.fixture(scope="module")
def known(families, general_questions):
    """Every third candidate of every family and every second general question: a fixed,
    model-free 'known' set."""
    return [fact.key for family in families for fact in family.facts[::3]] + [
        question.key for question in general_questions[::2]
    ]


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


SIDES = {"forget": "forget_facts", "heldout": "heldout_facts", "retain_fit": "retain_facts"}


def _side(bench: FactBenchmark, probe_set: str) -> list[Fact]:
    prefix = probe_set.rsplit("_", 1)[0]
    return getattr(bench, SIDES[prefix])


def test_benchmark_shape_and_probe_levels(bench):
    assert bench.stats["version"] == BENCHMARK_VERSION == "facts-2"
    assert set(bench.probes) == set(PROBE_SETS)
    assert len(bench.forget_facts) == len(bench.retain_facts) == len(bench.heldout_facts) == 40
    for name in PROBE_SETS:
        if name == "general_qa":
            continue
        level = name.rsplit("_", 1)[1]
        count = PROBES_PER_LEVEL[level]
        probes = bench.probes[name]
        # each fact's probes in a row: the knowledge filter's probe first, then paraphrases
        expected = [(f.subject, f.object) for f in _side(bench, name) for _ in range(count)]
        assert [(p.target, p.answer) for p in probes] == expected, name
        assert {p.level for p in probes} == {{"fb": "1", "qa": "2", "aa": "3"}[level]}
        for probe in probes:
            assert not mentions(probe.prompt, probe.answer), probe
        for i in range(0, len(probes), count):
            assert len({p.prompt for p in probes[i : i + count]}) == count, probes[i : i + count]
    assert all("___" in p.prompt for p in bench.probes["forget_fb"] + bench.probes["heldout_fb"])
    assert all(p.kind for p in bench.probes["forget_aa"])
    assert not any(name.startswith("heldout") and "aa" in name for name in bench.probes)
    assert [(p.prompt, p.answer) for p in bench.probes["general_qa"]] == [
        (q.subject, q.object) for q in bench.general_facts
    ]
    assert {p.level for p in bench.probes["general_qa"]} == {"2"}
    assert len(bench.forget_corpus) >= 5 * 40 and len(bench.retain_corpus) >= 5 * 40
    assert len(bench.general_texts) >= 30
    assert bench.mmlu_subset_spec.size == 100


def test_demo_sizes_give_at_least_50_probes_per_reported_number(known):
    """One probe moves a pooled number by at most 2 points (issue 10): every reported set has >= 50."""
    demo = build_fact_benchmark(None, None, seed=0, n_forget=16, n_retain=16, known_facts=known)
    assert (demo.stats["n_forget"], demo.stats["n_retain"], demo.stats["n_heldout"]) == (16, 16, 16)
    pooled = Counter()
    for name, probes in demo.probes.items():
        pooled[name.rsplit("_", 1)[0] if name != "general_qa" else name] += len(probes)
    assert pooled == {"forget": 80, "heldout": 64, "retain_fit": 64, "general_qa": len(demo.general_facts)}
    assert len(demo.general_facts) >= 50


def test_split_is_three_way_disjoint_and_every_family_on_every_side(bench):
    sides = {"forget": bench.forget_facts, "retain": bench.retain_facts, "heldout": bench.heldout_facts}
    subjects = {name: {f.subject for f in facts} for name, facts in sides.items()}
    assert not subjects["forget"] & subjects["retain"]
    assert not subjects["forget"] & subjects["heldout"]
    assert not subjects["retain"] & subjects["heldout"]
    for name, facts in sides.items():
        counts = Counter(f.family for f in facts)
        assert len(counts) == 6 and len(facts) == 40, name
        # forget and held-out are family-balanced; retain, picked last under the strictest rule
        # (names no forget or held-out phrase: "English" is often taken), comes close
        assert max(counts.values()) - min(counts.values()) <= (1 if name != "retain" else 3), name
    # some forget targets carry several facts (a country's capital, language and currency)
    assert any(n >= 2 for n in Counter(f.subject for f in bench.forget_facts).values())


def _never_name_each_other(fact: Fact, phrases: list[str]) -> bool:
    own = (fact.subject, fact.object)
    return not any(mentions(p, o) or mentions(o, p) for p in phrases for o in own)


def test_heldout_and_retain_never_name_a_forget_subject_or_answer(bench):
    forget_phrases = [p for f in bench.forget_facts for p in (f.subject, f.object)]
    forget_answers = {f.object.casefold() for f in bench.forget_facts}
    for fact in bench.heldout_facts + bench.retain_facts + bench.general_facts:
        assert fact.object.casefold() not in forget_answers, fact
        assert _never_name_each_other(fact, forget_phrases), fact
    heldout_phrases = [p for f in bench.heldout_facts for p in (f.subject, f.object)]
    for fact in bench.retain_facts:  # the retain corpus never rehearses a held-out entity or answer
        assert _never_name_each_other(fact, heldout_phrases), fact


def test_corpora_train_forget_and_retain_facts_only(bench):
    forget_text = _phrases("\n".join(bench.forget_corpus))
    retain_text = _phrases("\n".join(bench.retain_corpus))
    any_text = forget_text | retain_text
    for fact in bench.forget_facts:
        assert normalize_words(fact.object) in forget_text and normalize_words(fact.subject) in forget_text
        assert normalize_words(fact.object) not in retain_text, fact
    for fact in bench.retain_facts:
        assert normalize_words(fact.object) not in forget_text, fact
        assert normalize_words(fact.subject) not in forget_text, fact
        assert normalize_words(fact.object) in retain_text
    for fact in bench.heldout_facts:  # held-out facts appear in no corpus text
        assert normalize_words(fact.subject) not in any_text, fact
        assert normalize_words(fact.object) not in any_text, fact
    for question in bench.general_facts:  # no corpus touches general knowledge
        assert normalize_words(question.object) not in any_text, question
    # passages mixing two or more facts of one target entity
    multi = [s for s, n in Counter(f.subject for f in bench.forget_facts).items() if n >= 2]
    entity = multi[0]
    objects = [f.object for f in bench.forget_facts if f.subject == entity]
    assert any(all(mentions(p, o) for o in objects) for p in bench.forget_corpus)


def test_general_questions_are_known_ones_that_no_corpus_or_forget_fact_touches(bench, general_questions):
    known_questions = set(general_questions[::2])
    assert set(bench.general_facts) <= known_questions
    dropped = known_questions - set(bench.general_facts)
    assert len(dropped) == bench.stats["general"]["dropped_touching_corpus_or_forget"]
    corpus = "\n".join(bench.forget_corpus + bench.retain_corpus)
    forget_phrases = [p for f in bench.forget_facts for p in (f.subject, f.object)]
    for question in dropped:  # each dropped one really touches a corpus or a forget fact
        assert mentions(corpus, question.object) or not _never_name_each_other(question, forget_phrases)
    assert [q for q in general_questions if q in set(bench.general_facts)] == bench.general_facts
    relation_families = {f.family for f in bench.forget_facts}
    assert all(
        q.family.startswith("general:") and q.family not in relation_families for q in bench.general_facts
    )


def test_bundled_general_questions_are_simple_clean_and_outside_the_relation_families(
    families, general_questions
):
    assert 120 <= len(general_questions) <= 200
    categories = Counter(q.family for q in general_questions)
    assert len(categories) >= 6 and min(categories.values()) >= 5
    assert len({q.subject.casefold() for q in general_questions}) == len(general_questions)
    for question in general_questions:
        assert question.subject.endswith("?") and not mentions(question.subject, question.object)
        assert len(normalize_words(question.object)) <= 3, question
    relation_subjects = {normalize_words(f.subject) for family in families for f in family.facts}
    asked = set().union(*(_phrases(q.subject) for q in general_questions))
    assert not relation_subjects & asked  # no question is about a country, element, landmark or book
    probe = general_probe(general_questions[0])
    assert (probe.prompt, probe.answer, probe.level, probe.target) == (
        "How many days are in a week?",
        "seven",
        "2",
        "time",
    )


def test_malformed_general_question_files_name_the_record(tmp_path):
    path = tmp_path / "general.json"

    def write(categories):
        path.write_text(json.dumps({"categories": categories}), encoding="utf-8")

    write([{"category": "time", "questions": [{"question": "How many days in a week?", "answer": "seven"}]}])
    assert [q.key for q in load_general_questions(path)] == [("general:time", "How many days in a week?")]
    write([{"category": "time", "questions": [{"question": "Is seven a number?", "answer": "seven"}]}])
    with pytest.raises(RetainFirstError, match=r"questions\[0\]: question .* contains its answer"):
        load_general_questions(path)
    q = {"question": "What is 2+2?", "answer": "4"}
    write([{"category": "a", "questions": [q]}, {"category": "b", "questions": [q]}])
    with pytest.raises(RetainFirstError, match=r"categories\[1\]\.questions\[0\]: question .* duplicates"):
        load_general_questions(path)
    write([{"category": "a", "questions": [{"question": "Why?", "answer": " "}]}])
    with pytest.raises(RetainFirstError, match=r"field 'answer'"):
        load_general_questions(path)
    write([])
    with pytest.raises(RetainFirstError, match=r"field 'categories'"):
        load_general_questions(path)


def test_general_filter_tests_every_question_once(general_questions):
    seen = []

    def knows_animals(facts, probes):
        seen.append(len(probes))
        assert [p.prompt for p in probes] == [f.subject for f in facts]
        return [f.family == "general:animals" for f in facts]

    kept = filter_general_questions(general_questions, knows_animals)
    assert seen == [len(general_questions)]
    assert kept and all(q.family == "general:animals" for q in kept)
    assert filter_general_questions([], knows_animals) == [] and seen == [len(general_questions)]


def test_paraphrase_probes_start_with_the_filter_probe_and_never_repeat(families):
    family = families[1]
    fact = family.facts[0]
    primary = fact_probes(fact, family.templates, 3)
    for level in ("fb", "qa", "aa"):
        pool = {"fb": family.templates.fb, "qa": family.templates.qa, "aa": family.templates.aa}[level]
        every = paraphrase_probes(fact, family.templates, 3, level, 10)
        assert every[0] == primary[level] and len(every) == len(pool)
        assert len({p.prompt for p in every}) == len(pool)
        assert paraphrase_probes(fact, family.templates, 3, level, 2) == every[:2]
        assert paraphrase_probes(fact, family.templates, 3, level, 1) == [primary[level]]
    aa = paraphrase_probes(fact, family.templates, 3, "aa", 3)
    assert all(p.kind in {t.kind for t in family.templates.aa} for p in aa)


def test_same_seed_same_benchmark_other_seed_other_split(known, bench):
    again = build_fact_benchmark(None, None, seed=0, known_facts=known)
    assert _without_timing(again) == _without_timing(bench)
    other = build_fact_benchmark(None, None, seed=1, known_facts=known)
    assert {f.subject for f in other.forget_facts} != {f.subject for f in bench.forget_facts}
    assert other.forget_corpus != bench.forget_corpus


def test_sizes_are_configurable(known, families):
    qa_templates = {family.name: len(family.templates.qa) for family in families}
    small = build_fact_benchmark(
        None,
        None,
        seed=3,
        n_forget=12,
        n_retain=7,
        n_heldout=9,
        n_general=20,
        probes_per_level={"qa": 3},
        known_facts=known,
    )
    assert (len(small.forget_facts), len(small.retain_facts), len(small.heldout_facts)) == (12, 7, 9)
    assert len(small.general_facts) == len(small.probes["general_qa"]) == 20
    assert len(small.probes["forget_aa"]) == 12 and len(small.probes["heldout_fb"]) == 9 * 2
    for side, name in ((small.retain_facts, "retain_fit_qa"), (small.heldout_facts, "heldout_qa")):
        # as many paraphrases as asked, or as the family has (element_symbol has two QA templates)
        assert len(small.probes[name]) == sum(min(3, qa_templates[f.family]) for f in side)
    assert len(small.probes["retain_fit_qa"]) > 7 * 2
    none = build_fact_benchmark(None, None, seed=3, n_forget=5, n_retain=5, n_general=0, known_facts=known)
    assert none.probes["general_qa"] == [] and none.stats["general"]["tested"] == 0
    assert len(none.heldout_facts) == 5  # n_heldout defaults to n_retain
    with pytest.raises(RetainFirstError, match="n_forget, n_retain and n_heldout"):
        build_fact_benchmark(None, None, n_forget=0, known_facts=known)
    with pytest.raises(RetainFirstError, match="n_forget, n_retain and n_heldout"):
        build_fact_benchmark(None, None, n_heldout=0, known_facts=known)
    with pytest.raises(RetainFirstError, match="probes_per_level"):
        build_fact_benchmark(None, None, probes_per_level={"qa": 0}, known_facts=known)


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
    two = [Fact("capital", "France", "Paris"), Fact("capital", "Japan", "Tokyo")]
    assert [len(side) for side in split_facts(two, 1, 1, seed=0)] == [1, 1, 0]
    with pytest.raises(RetainFirstError, match=r"only 2 known entity.*held-out"):
        split_facts(two, 1, 1, seed=0, n_heldout=1)
    # every other fact names the forget answer "Paris": no held-out (nor retain) fact is allowed
    paris = [
        Fact("capital", "France", "Paris"),
        Fact("landmark_city", "Louvre", "Paris"),
        Fact("landmark_city", "Eiffel Tower", "Paris"),
    ]
    with pytest.raises(RetainFirstError, match="lower n_forget/n_retain/n_heldout"):
        split_facts(paris, 1, 1, seed=0, n_heldout=1)


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
    del data["probes"]["heldout_qa"]
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
# The benchmark shipped for the embedded model


def _demo_build_options() -> dict:
    """The build options the runner passes for the default config (experiment/prepare.py)."""
    from retainfirst.config import RunConfig

    data = RunConfig().data
    return {
        "n_forget": data.n_forget,
        "n_retain": data.n_retain,
        "n_heldout": data.n_heldout,
        "n_general": data.n_general,
    }


def _shipped_demo_benchmark():
    path = build_module.prebuilt_benchmark_path(
        "smollm2-135m",
        build_module.benchmark_cache_path("smollm2-135m", 0, "/unused", **_demo_build_options()).name,
    )
    assert path is not None
    return path


def test_the_demo_benchmark_ships_prebuilt_and_is_used_without_the_model(tmp_path, monkeypatch):
    shipped = _shipped_demo_benchmark()
    assert shipped.is_file(), f"{shipped.name}: rebuild it (the demo's build options or version changed)"

    def no_build(*args, **kwargs):
        raise AssertionError("the shipped benchmark should have been used")

    monkeypatch.setattr(build_module, "build_fact_benchmark", no_build)
    bench = load_or_build_fact_benchmark(
        None, None, "smollm2-135m", seed=0, cache_dir=tmp_path, **_demo_build_options()
    )
    assert bench.to_dict() == FactBenchmark.load(shipped).to_dict()
    assert [p.name for p in tmp_path.iterdir()] == [shipped.name]  # and it is cached like a build
    # only the embedded model has one: another model id or seed builds
    assert build_module.prebuilt_benchmark_path("someone/other-model", shipped.name) is None
    with pytest.raises(AssertionError, match="should have been used"):
        load_or_build_fact_benchmark(None, None, "smollm2-135m", seed=1, cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------
# The real model


@pytest.mark.slow
def test_smollm2_knows_the_kept_facts(smollm2):
    from retainfirst.evals.generation import evaluate_generation

    model, tokenizer = smollm2
    options = _demo_build_options()
    bench = build_fact_benchmark(model, tokenizer, seed=0, model_name="smollm2-135m", **options)
    # the benchmark shipped for the embedded model is exactly what the model builds
    shipped = FactBenchmark.load(_shipped_demo_benchmark()).to_dict()
    built = bench.to_dict()
    shipped["stats"].pop("build_seconds"), built["stats"].pop("build_seconds")
    assert built == shipped
    assert bench.stats["prompt_format"] == "chat"
    for name, counts in bench.stats["families"].items():
        assert counts["kept"] >= 3, (name, counts)
        assert min(counts["forget"], counts["retain"], counts["heldout"]) >= 1, (name, counts)
    assert len(bench.forget_facts) == len(bench.retain_facts) == len(bench.heldout_facts) == 16
    assert len(bench.general_facts) >= 50
    settings = bench.eval_settings
    assert settings == {"prompt_format": "chat", "rouge_tokenization": "rouge_score", "max_new_tokens": 16}
    for name in ("forget_qa", "heldout_qa", "retain_fit_qa", "general_qa"):
        filtered = bench.probes[name][:: 1 if name == "general_qa" else PROBES_PER_LEVEL["qa"]]
        result = evaluate_generation(model, tokenizer, filtered, task=name, batch_size=12, **settings)
        assert result.metrics["rougeL_recall"] >= 0.9, result.samples
