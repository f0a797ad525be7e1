"""Text corpora: file formats, errors, packing, pairs and batching."""

from __future__ import annotations

import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from retainfirst.data import collate, load_texts, load_wmdp_corpus, tokenize_pairs, tokenize_texts
from retainfirst.errors import RetainFirstError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_load_texts_jsonl_json_parquet_and_field(tmp_path):
    records = [{"text": "alpha", "body": "A"}, {"text": "beta", "body": "B"}]
    assert load_texts(write_jsonl(tmp_path / "c.jsonl", records)) == ["alpha", "beta"]
    assert load_texts(write_jsonl(tmp_path / "d.jsonl", records), field="body") == ["A", "B"]
    (tmp_path / "c.json").write_text(json.dumps(records))
    assert load_texts(tmp_path / "c.json") == ["alpha", "beta"]
    (tmp_path / "s.json").write_text(json.dumps(["one", "two"]))
    assert load_texts(tmp_path / "s.json") == ["one", "two"]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet")
    assert load_texts(tmp_path / "c.parquet", limit=1) == ["alpha"]


def test_plain_text_blocks_and_lines(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first line\nsame doc\n\n\nsecond doc\n\nthird\n")
    assert load_texts(path) == ["first line\nsame doc", "second doc", "third"]
    assert load_texts(path, txt_split="line") == ["first line", "same doc", "second doc", "third"]
    with pytest.raises(RetainFirstError, match="txt_split"):
        load_texts(path, txt_split="paragraph")


def test_empty_documents_are_skipped(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}, {"text": "  "}, {"text": "b"}])
    assert load_texts(path) == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ('{"text": "ok"}\n{"txt": "x"}\n', r"c\.jsonl: record 2 has no field 'text'"),
        ('{"text": "ok"}\n{"text": \n', r"c\.jsonl: record 2 \(line 2\) is not valid JSON"),
        ("", r"c\.jsonl: file is empty"),
        ('{"text": 3}\n', r"record 1 field 'text' is a int"),
        ('["a"]\n', r"record 1 \(line 1\) is a list"),
    ],
)
def test_malformed_jsonl_names_file_record_field(tmp_path, content, pattern):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(RetainFirstError, match=pattern):
        load_texts(path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(RetainFirstError, match="no such file"):
        load_texts(tmp_path / "absent.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(RetainFirstError, match="unsupported file type"):
        load_texts(tmp_path / "x.csv")


def test_hub_id_without_datasets_says_install_hub_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(RetainFirstError, match=r"retainfirst\[hub\]"):
        load_texts("someone/some-corpus")


def test_wmdp_corpus_layout(tmp_path):
    write_jsonl(tmp_path / "bio-forget-corpus.jsonl", [{"title": "t", "text": "forget me"}])
    write_jsonl(tmp_path / "cyber-retain-corpus.jsonl", [{"text": "keep me"}])
    assert load_wmdp_corpus(tmp_path, "bio", "forget") == ["forget me"]
    assert load_wmdp_corpus(tmp_path, "cyber", "retain") == ["keep me"]
    with pytest.raises(RetainFirstError, match=r"cyber-forget-corpus\.jsonl"):
        load_wmdp_corpus(tmp_path, "cyber", "forget")
    with pytest.raises(RetainFirstError, match="choose one of bio, cyber"):
        load_wmdp_corpus(tmp_path, "chem", "forget")


def test_pack_concatenates_with_eos_and_drops_tail(byte_tokenizer):
    eos = byte_tokenizer.eos_token_id
    examples = tokenize_texts(["abcd", "efg"], byte_tokenizer, max_length=3)
    stream = [*byte_tokenizer("abcd")["input_ids"], eos, *byte_tokenizer("efg")["input_ids"], eos]
    assert len(stream) == 9
    assert [e["input_ids"].tolist() for e in examples] == [stream[0:3], stream[3:6], stream[6:9]]
    short = tokenize_texts(["abcd", "ef"], byte_tokenizer, max_length=3)  # 8 tokens: tail of 2 dropped
    assert [len(e["input_ids"]) for e in short] == [3, 3]
    kept = tokenize_texts(["abcd", "ef"], byte_tokenizer, max_length=3, keep_tail=True)
    assert [len(e["input_ids"]) for e in kept] == [3, 3, 2]
    only = tokenize_texts(["ab"], byte_tokenizer, max_length=8)  # the only chunk is kept
    assert only[0]["input_ids"].tolist() == [*byte_tokenizer("ab")["input_ids"], eos]
    assert all(e["attention_mask"].sum() == len(e["input_ids"]) for e in examples)
    assert all(e["input_ids"].dtype == torch.long for e in examples)


def test_unpacked_documents_are_truncated(byte_tokenizer):
    examples = tokenize_texts(["abcdef", "xy"], byte_tokenizer, max_length=4, pack=False, add_eos=False)
    assert [e["input_ids"].tolist() for e in examples] == [
        byte_tokenizer("abcd")["input_ids"],
        byte_tokenizer("xy")["input_ids"],
    ]
    with pytest.raises(RetainFirstError, match="single string"):
        tokenize_texts("abc", byte_tokenizer)


def test_collate_right_pads_and_masks():
    examples = [
        {"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.ones(3, dtype=torch.long)},
        {"input_ids": torch.tensor([8]), "attention_mask": torch.ones(1, dtype=torch.long)},
    ]
    batch = collate(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["loss_mask"].tolist() == batch["attention_mask"].tolist()
    with pytest.raises(RetainFirstError, match="empty list"):
        collate([], 0)
    with pytest.raises(RetainFirstError, match="example 1 loss_mask"):
        collate([{"input_ids": torch.tensor([1, 2]), "loss_mask": torch.tensor([1])}], 0)


def test_tokenize_pairs_masks_only_answer_tokens(byte_tokenizer):
    examples = tokenize_pairs(["Q: 2+2?\nA:"], [" 4"], byte_tokenizer, max_length=64)
    ids = examples[0]["input_ids"].tolist()
    mask = examples[0]["loss_mask"].tolist()
    prompt = byte_tokenizer("Q: 2+2?\nA:")["input_ids"]
    answer = byte_tokenizer(" 4")["input_ids"]
    assert ids == [*prompt, *answer, byte_tokenizer.eos_token_id]
    assert mask == [0] * len(prompt) + [1] * (len(answer) + 1)
    batch = collate([*examples, *tokenize_pairs(["x"], ["yz"], byte_tokenizer)], pad_token_id=0)
    assert batch["loss_mask"][1].tolist()[:4] == [0, 1, 1, 1]
    assert batch["loss_mask"][1].sum() == 3


def test_tokenize_pairs_truncates_prompt_first_and_validates(byte_tokenizer):
    example = tokenize_pairs(["abcdefgh"], ["xy"], byte_tokenizer, max_length=5, add_eos=False)[0]
    assert example["input_ids"].tolist() == byte_tokenizer("fghxy")["input_ids"]
    assert example["loss_mask"].tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(RetainFirstError, match="2 prompts but 1 answers"):
        tokenize_pairs(["a", "b"], ["c"], byte_tokenizer)
    with pytest.raises(RetainFirstError, match="answer 1 is empty"):
        tokenize_pairs(["a"], [""], byte_tokenizer)
