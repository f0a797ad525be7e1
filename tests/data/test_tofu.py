"""TOFU loader: the hub files (JSON Lines named .json, .jsonl, parquet folders), written in tmp_path."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retainfirst.data.tofu import format_question, load_tofu, load_tofu_pairs, tofu_training_pairs
from retainfirst.errors import RetainFirstError


def perturbed(question, answer, paraphrased=None, wrong=("W1", "W2")):
    record = {"question": question, "answer": answer, "perturbed_answer": list(wrong)}
    if paraphrased is not None:
        record["paraphrased_answer"] = paraphrased
        record["paraphrased_question"] = question + "?"
    return record


def write_tofu(root, *, forget_n=3):
    """forget01 as the hub's JSON Lines .json, retain as .jsonl, real authors as a parquet folder,
    world facts as a JSON array: every layout the loader accepts."""
    forget = [perturbed(f"Q{i}", f"A{i}", f"P{i}", (f"X{i}", f"Y{i}")) for i in range(forget_n)]
    (root / "forget01_perturbed.json").write_text("".join(json.dumps(r) + "\n" for r in forget))
    retain = [perturbed("RQ", "RA", "RP", ("RX", "RY", "RZ"))]
    (root / "retain_perturbed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in retain))
    (root / "real_authors_perturbed" / "train").mkdir(parents=True)
    real = [perturbed("Who wrote Hamlet?", "Shakespeare", wrong=("Dickens", "Austen"))]
    pq.write_table(pa.Table.from_pylist(real), root / "real_authors_perturbed" / "train" / "0000.parquet")
    world = [perturbed("Capital of France?", "Paris", wrong=("Rome",))]
    (root / "world_facts_perturbed.json").write_text(json.dumps(world))
    (root / "forget01.json").write_text(
        "".join(json.dumps({"question": f"Q{i}", "answer": f"A{i}"}) + "\n" for i in range(2))
    )
    (root / "retain99.json").write_text(json.dumps({"question": "RQ", "answer": "RA"}) + "\n")
    return root


def test_loads_every_layout_and_keeps_the_fields(tmp_path):
    data = load_tofu(write_tofu(tmp_path), "forget01")
    assert data.counts() == {"forget": 3, "retain": 1, "real_authors": 1, "world_facts": 1}
    first = data.sets["forget"][0]
    assert (first.question, first.answer, first.paraphrased_answer, first.perturbed_answers) == (
        "Q0",
        "A0",
        "P0",
        ("X0", "Y0"),
    )
    assert first.base_answer == "P0"
    real = data.sets["real_authors"][0]
    assert real.paraphrased_answer is None and real.base_answer == "Shakespeare"
    assert real.perturbed_answers == ("Dickens", "Austen")
    assert data.sets["world_facts"][0].perturbed_answers == ("Rome",)
    assert data.sets["retain"][0].perturbed_answers == ("RX", "RY", "RZ")


def test_limit_keeps_the_first_items(tmp_path):
    data = load_tofu(write_tofu(tmp_path), "forget01", limit=2)
    assert [i.answer for i in data.sets["forget"]] == ["A0", "A1"]


def test_errors_name_what_to_fix(tmp_path):
    write_tofu(tmp_path)
    with pytest.raises(RetainFirstError, match="forget05_perturbed"):
        load_tofu(tmp_path, "forget05")
    with pytest.raises(RetainFirstError, match="choose one of forget01"):
        load_tofu(tmp_path, "forget50")
    (tmp_path / "world_facts_perturbed.json").write_text(json.dumps([{"question": "q", "answer": "a"}]))
    with pytest.raises(RetainFirstError, match="perturbed_answer"):
        load_tofu(tmp_path, "forget01")


def test_training_pairs_use_tofu_prompts(tmp_path):
    write_tofu(tmp_path)
    assert load_tofu_pairs(tmp_path, "forget01") == [("Q0", "A0"), ("Q1", "A1")]
    forget, retain = tofu_training_pairs(tmp_path, "forget01")
    assert forget[0] == ("[INST] Q0 [/INST]", "A0")
    assert retain == [("[INST] RQ [/INST]", "RA")]
    assert format_question("Q", "qa") == "Question: Q\nAnswer: "
