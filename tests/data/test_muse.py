"""MUSE loader: the hub's parquet layout and MUSE's own JSON layout, written here in tmp_path."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retainfirst.data.muse import load_muse, load_muse_texts
from retainfirst.errors import RetainFirstError


def parquet(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)


def write_hub_layout(root):
    """muse-bench/MUSE-News on the hub: <config>/<split>-00000-of-00001.parquet (retain2_* names)."""
    parquet(root / "verbmem" / "forget-00000-of-00001.parquet", [{"prompt": "Once upon", "gt": " a time"}])
    qa = [{"question": "Who?", "answer": "Ann"}, {"question": "Where?", "answer": "Rome"}]
    parquet(root / "knowmem" / "forget_qa-00000-of-00001.parquet", qa)
    parquet(root / "knowmem" / "forget_qa_icl-00000-of-00001.parquet", qa[:1])
    parquet(root / "knowmem" / "retain2_qa-00000-of-00001.parquet", qa[1:])
    parquet(root / "knowmem" / "retain2_qa_icl-00000-of-00001.parquet", qa[:1])
    for split in ("forget", "holdout", "retain2"):
        parquet(
            root / "privleak" / f"{split}-00000-of-00001.parquet",
            [{"text": f"{split} one"}, {"text": f"{split} two"}],
        )
    parquet(root / "raw" / "forget-00000-of-00001.parquet", [{"text": "raw forget"}])
    return root


def test_hub_layout(tmp_path):
    data = load_muse(write_hub_layout(tmp_path))
    assert data.verbmem == [("Once upon", " a time")]
    assert data.knowmem_forget == [("Who?", "Ann"), ("Where?", "Rome")]
    assert data.knowmem_forget_icl == [("Who?", "Ann")]
    assert data.knowmem_retain == [("Where?", "Rome")]  # read from retain2_qa
    assert data.privleak_forget == ["forget one", "forget two"]
    assert data.privleak_retain == ["retain2 one", "retain2 two"]
    assert load_muse_texts(tmp_path, "raw", "forget") == ["raw forget"]


def test_muse_repo_json_layout_without_knowmem(tmp_path):
    """data/<corpus>/... as MUSE's load_data.py writes it: JSON arrays (privleak: plain strings)."""
    (tmp_path / "verbmem").mkdir()
    (tmp_path / "privleak").mkdir()
    (tmp_path / "verbmem" / "forget.json").write_text(json.dumps([{"prompt": "p", "gt": "g"}]))
    (tmp_path / "privleak" / "forget.json").write_text(json.dumps(["f1", "f2"]))
    (tmp_path / "privleak" / "holdout.json").write_text(json.dumps(["h1"]))
    data = load_muse(tmp_path)
    assert data.privleak_forget == ["f1", "f2"] and data.privleak_holdout == ["h1"]
    assert data.knowmem_forget == [] and data.privleak_retain == []


def test_missing_split_is_an_error(tmp_path):
    (tmp_path / "verbmem").mkdir()
    (tmp_path / "verbmem" / "forget.json").write_text(json.dumps([{"prompt": "p", "gt": "g"}]))
    with pytest.raises(RetainFirstError, match="privleak: no MUSE split 'forget'"):
        load_muse(tmp_path)
    with pytest.raises(RetainFirstError, match="does not exist"):
        load_muse(tmp_path / "nope")
