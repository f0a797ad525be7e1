"""``retainfirst data``: layout, verification with the loaders, MANIFEST.json, idempotency, offline errors.

The hub is replaced by a fake that serves records from a local layout made here; nothing goes online.
"""

import hashlib
import json
import socket

import pytest

from retainfirst import cli
from retainfirst.data import download
from retainfirst.data.corpora import load_wmdp_corpus
from retainfirst.data.mcq import load_wmdp_mcq
from retainfirst.data.muse import load_muse, load_muse_texts
from retainfirst.data.rwku import load_rwku
from retainfirst.data.tofu import load_tofu, tofu_training_pairs
from retainfirst.errors import RetainFirstError


def fake_records(repo, config, split):
    """Two records per split, with the fields the real hub datasets have."""
    name = config or repo.split("/")[-1]
    if repo == "cais/wmdp":
        return [{"question": f"{name} q{i}?", "choices": ["a", "b", "c", "d"], "answer": i} for i in range(2)]
    if repo.startswith("cais/wmdp"):
        return [{"text": f"{name} document {i}"} for i in range(2)]
    if repo == "jinzhuoran/RWKU":
        targets = ["Ann Smith", "Bo Li"]
        if name == "forget_target":
            return [{"target": t, "intro": f"{t} is famous."} for t in targets]
        if name == "train_original_passage":
            return [{"subject": t, "text": f"A passage about {t}."} for t in targets]
        level = name[-1]
        return [
            {"subject": t, "query": f"Who is {t}? ({name})", "answer": "someone", "level": level, "type": "x"}
            for t in targets
        ]
    if repo == "locuslab/TOFU":
        records = [{"question": f"{name} q{i}?", "answer": f"a{i}"} for i in range(2)]
        if name.endswith("_perturbed"):
            for r in records:
                r["perturbed_answer"] = ["wrong one", "wrong two"]
                if name.startswith(("forget", "retain")):
                    r["paraphrased_answer"] = r["answer"] + " indeed"
        return records
    if repo.startswith("muse-bench/"):
        if config == "verbmem":
            return [{"prompt": f"p{i}", "gt": f"g{i}"} for i in range(2)]
        if config == "knowmem":
            return [{"question": f"{split} q{i}", "answer": f"a{i}"} for i in range(2)]
        return [{"text": f"{config}/{split} text {i}"} for i in range(2)]
    raise AssertionError(f"unexpected dataset {repo} {config} {split}")


class FakeHub:
    """Serves fake_records and counts the calls; ``gated`` repos refuse without a token."""

    def __init__(self, monkeypatch, gated_ok=False):
        self.calls = []
        self.gated_ok = gated_ok
        monkeypatch.setattr(download, "fetch_split", self.fetch)
        monkeypatch.setattr(download, "check_network", lambda *a, **k: None)
        monkeypatch.setattr(download, "_require_datasets", lambda: None)
        monkeypatch.setattr(download, "hub_token", lambda: "hf_fake" if gated_ok else None)

    def fetch(self, repo, config, split, token):
        self.calls.append((repo, config, split))
        if repo == "cais/wmdp-bio-forget-corpus" and not token:
            raise PermissionError("Dataset is gated")
        return fake_records(repo, config, split)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tofu_layout_manifest_and_loaders(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    folder = tmp_path / "TOFU"
    report = download.setup_benchmark("tofu", folder, log=lambda line: None)
    assert len(hub.calls) == len(download.TOFU_CONFIGS) == 12
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{c}.json" for c in download.TOFU_CONFIGS] + ["MANIFEST.json"]
    )
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["benchmark"] == "tofu"
    entry = manifest["files"]["forget10.json"]
    assert entry == {
        "source": "locuslab/TOFU:forget10:train",
        "records": 2,
        "bytes": (folder / "forget10.json").stat().st_size,
        "sha256": _sha(folder / "forget10.json"),
    }
    assert report.downloaded == [f"{c}.json" for c in download.TOFU_CONFIGS] and report.kept == []
    forget, retain = tofu_training_pairs(folder, "forget05")
    assert len(forget) == len(retain) == 2
    assert load_tofu(folder, "forget01").sets["forget"][0].paraphrased_answer == "a0 indeed"


def test_second_run_downloads_nothing_and_needs_no_network(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    folder = tmp_path / "TOFU"
    download.setup_benchmark("tofu", folder, log=lambda line: None)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != "MANIFEST.json"}
    hub.calls.clear()

    def offline(*args, **kwargs):
        raise RetainFirstError("offline")

    monkeypatch.setattr(download, "check_network", offline)
    report = download.setup_benchmark("tofu", folder, log=lambda line: None)
    assert hub.calls == [] and report.downloaded == [] and len(report.kept) == 12
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != "MANIFEST.json"} == before


def test_a_changed_file_is_fetched_again(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    folder = tmp_path / "TOFU"
    download.setup_benchmark("tofu", folder, log=lambda line: None)
    (folder / "retain90.json").write_text('{"question": "tampered", "answer": "x"}\n')
    (folder / "forget01.json").unlink()
    hub.calls.clear()
    report = download.setup_benchmark("tofu", folder, log=lambda line: None)
    assert sorted(hub.calls) == [
        ("locuslab/TOFU", "forget01", "train"),
        ("locuslab/TOFU", "retain90", "train"),
    ]
    assert sorted(report.downloaded) == ["forget01.json", "retain90.json"]
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["files"]["retain90.json"]["sha256"] == _sha(folder / "retain90.json")
    assert "tampered" not in (folder / "retain90.json").read_text()


def test_wmdp_layout_and_gated_bio_forget_is_skipped_with_a_note(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    folder = tmp_path / "wmdp"
    lines = []
    report = download.setup_benchmark("wmdp", folder, log=lines.append)
    assert ("cais/wmdp-bio-forget-corpus", None, "train") not in hub.calls  # no token: not even tried
    assert list(report.skipped) == ["bio-forget-corpus.jsonl"]
    assert any("gated" in line and "HF_TOKEN" in line for line in lines)
    assert (folder / "wmdp-bio" / "test-00000-of-00001.parquet").is_file()
    assert [q.answer for q in load_wmdp_mcq(folder, "cyber")] == [0, 1]
    assert load_wmdp_corpus(folder, "cyber", "forget") == [
        "cyber-forget-corpus document 0",
        "cyber-forget-corpus document 1",
    ]
    assert not (folder / "bio-forget-corpus.jsonl").exists()
    assert "bio-forget-corpus.jsonl" not in json.loads((folder / "MANIFEST.json").read_text())["files"]


def test_wmdp_with_a_token_gets_the_gated_corpus(tmp_path, monkeypatch):
    FakeHub(monkeypatch, gated_ok=True)
    folder = tmp_path / "wmdp"
    report = download.setup_benchmark("wmdp", folder, log=lambda line: None)
    assert report.skipped == {}
    assert load_wmdp_corpus(folder, "bio", "forget")[0] == "wmdp-bio-forget-corpus document 0"


def test_rwku_and_muse_layouts_load(tmp_path, monkeypatch):
    FakeHub(monkeypatch)
    download.setup_benchmark("rwku", tmp_path / "RWKU", log=lambda line: None)
    data = load_rwku(tmp_path / "RWKU")
    assert data.targets == ["Ann Smith", "Bo Li"]
    assert data.counts()["forget_fb"] == 2 and data.passages["Bo Li"] == ["A passage about Bo Li."]
    download.setup_benchmark("muse", tmp_path / "MUSE-News", log=lambda line: None)
    muse = load_muse(tmp_path / "MUSE-News")
    assert muse.verbmem == [("p0", "g0"), ("p1", "g1")] and len(muse.knowmem_retain) == 2
    # the bundled MUSE configs name this file
    assert (tmp_path / "MUSE-News" / "raw" / "forget-00000-of-00001.parquet").is_file()
    assert load_muse_texts(tmp_path / "MUSE-News", "raw", "retain1")[0] == "raw/retain1 text 0"


def test_a_copy_the_loaders_reject_leaves_nothing_behind(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    original = hub.fetch

    def broken(repo, config, split, token):
        records = original(repo, config, split, token)
        return [{"question": r["question"]} for r in records] if config == "retain99" else records

    monkeypatch.setattr(download, "fetch_split", broken)
    with pytest.raises(RetainFirstError, match="answer"):
        download.setup_benchmark("tofu", tmp_path / "TOFU", log=lambda line: None)
    assert not (tmp_path / "TOFU").exists()


def test_cli_without_network_fails_at_once_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(download, "_require_datasets", lambda: None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(download, "hub_token", lambda: None)

    def unreachable(address, timeout=None):
        assert address == ("huggingface.co", 443) and timeout == 3.0
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert cli.main(["data", "tofu", "--dir", str(tmp_path / "TOFU")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "retainfirst: error: cannot reach huggingface.co (Network is unreachable); "
        "retainfirst data needs network access to the Hugging Face hub"
    )
    assert not (tmp_path / "TOFU").exists()


def test_cli_offline_mode_and_unknown_name(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(download, "_require_datasets", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["data", "rwku", "--dir", str(tmp_path / "R")]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert cli.main(["data", "nope"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_reports_what_it_did(tmp_path, monkeypatch, capsys):
    FakeHub(monkeypatch)
    assert cli.main(["data", "tofu", "--dir", str(tmp_path / "T")]) == 0
    assert "12 file(s) downloaded, 0 already verified" in capsys.readouterr().out
    assert cli.main(["data", "tofu", "--dir", str(tmp_path / "T")]) == 0
    assert "0 file(s) downloaded, 12 already verified" in capsys.readouterr().out
