"""Damaged user files through ``run``, ``eval`` and ``--resume`` (issue 14): exit 2, one line, no leftovers.

Only ``cli.main`` and files on disk are used, so these tests hold whatever module runs the commands.
Each damaged input is one of: binary, truncated, empty, wrong JSON (valid JSON of the wrong shape),
dangling symbolic link.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from retainfirst import cli
from retainfirst.experiment.rundir import LOCK_FILE, STATUS_FILE, close_open_rundirs
from retainfirst.models import build_byte_tokenizer, build_tiny_llama

KINDS = ("binary", "truncated", "empty", "wrong_json", "dangling")
BINARY = b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01" + bytes(range(128, 256))
GENERAL = "The café sat on the mat.\n\nA quick brown fox.\n"


def write_inputs(folder: Path) -> Path:
    """A tiny model, forget/retain/general texts, WMDP questions and a run config; returns the config."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_byte_tokenizer()
    model = build_tiny_llama(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model.save_pretrained(folder / "tiny")
    tokenizer.save_pretrained(folder / "tiny")
    for kind, text in (
        ("forget", "The secret code {i} is {j}."),
        ("retain", "Paris is in France, fact {i}."),
    ):
        lines = [json.dumps({"text": text.format(i=i, j=i * 7919)}) for i in range(4)]
        (folder / f"{kind}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "general.txt").write_text(GENERAL, encoding="utf-8")
    question = {"question": "Which is a virus?", "choices": ["HIV", "salt", "iron", "glass"], "answer": 0}
    (folder / "wmdp-bio.jsonl").write_text(2 * (json.dumps(question) + "\n"))
    config = folder / "tiny.yaml"
    config.write_text(
        "synthesizers: [sum]\n"
        "name: tiny\n"
        f"model: {folder / 'tiny'}\n"
        "keep_finished_checkpoints: true\n"
        f"data: {{source: corpus, dir: {folder}, forget: forget.jsonl, retain: retain.jsonl,\n"
        "       max_length: 16}\n"
        "train: {steps: 2, forget_batch_size: 2, retain_batch_size: 2, disable_progress: true,\n"
        "        save_final_model: false, forget_loss: ga, forget_kwargs: {}}\n"
        "eval: {tasks: [perplexity], ppl_texts: general.txt, batch_size: 4}\n"
    )
    return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run directory whose `sum` sub-run is marked failed (so --resume reads its checkpoint)."""
    base = tmp_path_factory.mktemp("finished")
    config = write_inputs(base / "inputs")
    out = base / "run"
    assert cli.main(["run", str(config), "--out", str(out)]) == 0
    status = json.loads((out / STATUS_FILE).read_text())
    status["state"] = "failed"
    status["runs"]["sum"]["state"] = "failed"
    (out / STATUS_FILE).write_text(json.dumps(status))
    assert [p.name for p in out.rglob("latest")] == ["latest"]
    return out


@pytest.fixture(autouse=True)
def no_demo_model(monkeypatch):
    """A damaged config must never fall back to the bundled demo (SmolLM2): fail loudly if it does."""

    def refuse(alias):
        raise AssertionError(f"the demo model {alias} would have been loaded")

    monkeypatch.setattr("retainfirst.models.materialize_embedded", refuse)
    yield
    close_open_rundirs()


def damage(path: Path, kind: str, target_dir: Path) -> None:
    """Replace the file at ``path`` with a damaged version of kind ``kind``."""
    good = path.read_bytes()
    if kind == "binary":
        data = BINARY
    elif kind == "truncated":
        data = truncated(path, good)
    elif kind == "empty":
        data = b""
    elif kind == "wrong_json":
        data = wrong_json(path)
    else:
        path.unlink()
        path.symlink_to(target_dir / "no-such-target")
        return
    path.unlink()
    path.write_bytes(data)


def truncated(path: Path, good: bytes) -> bytes:
    if path.suffix == ".yaml":
        return good[: good.index(b"{") + 1]  # inside the first flow mapping
    if path.suffix == ".txt":
        return good[: good.index("é".encode()) + 1]  # inside a two-byte character
    if path.suffix == ".jsonl":
        return good[: good.index(b"\n") + 10]  # the second record is cut
    return good[: len(good) // 2]


def wrong_json(path: Path) -> bytes:
    if path.suffix == ".safetensors":
        header = b'{"a": [1, 2, 3]}'
        return struct.pack("<Q", len(header)) + header
    if path.name == "latest":
        return b'{"step": 1}\n'
    if path.name == STATUS_FILE:
        return b'{"runs": 3}'
    return b"[1, 2]\n"


def assert_one_error_line(capsys, names: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("retainfirst: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err
    assert names in errors[0], errors[0]
    return errors[0]


def assert_nothing_left(root: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in root.iterdir() if p.name.startswith(f".{out.name}")]  # no set-aside copy
    assert not list(root.rglob(LOCK_FILE))


def rows(kinds, marks=None):
    marks = marks or {}
    return [pytest.param(kind, marks=marks.get(kind, ()), id=kind) for kind in kinds]


# ----------------------------------------------------------------------------------------------
# run


@pytest.mark.parametrize("kind", rows(KINDS))
def test_run_with_a_damaged_config(tmp_path, capsys, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    config = write_inputs(tmp_path / "inputs")
    damage(config, kind, tmp_path)
    assert cli.main(["run", str(config), "--out", str(tmp_path / "out")]) == 2
    assert_one_error_line(capsys, config.name)
    assert_nothing_left(tmp_path, tmp_path / "out")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["forget.jsonl", "general.txt"])
@pytest.mark.parametrize("kind", KINDS)
def test_run_with_a_damaged_data_file(tmp_path, capsys, kind, name):
    if name.endswith(".txt") and kind == "wrong_json":
        pytest.skip("a text file has no JSON shape to get wrong")
    config = write_inputs(tmp_path / "inputs")
    damage(tmp_path / "inputs" / name, kind, tmp_path)
    assert cli.main(["run", str(config), "--out", str(tmp_path / "out")]) == 2
    assert_one_error_line(capsys, name)
    assert_nothing_left(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("kind", KINDS)
def test_run_with_a_damaged_model_file(tmp_path, capsys, kind):
    config = write_inputs(tmp_path / "inputs")
    damage(tmp_path / "inputs" / "tiny" / "model.safetensors", kind, tmp_path)
    assert cli.main(["run", str(config), "--out", str(tmp_path / "out")]) == 2
    assert_one_error_line(capsys, "model.safetensors")
    assert_nothing_left(tmp_path, tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# eval


@pytest.mark.parametrize("kind", KINDS)
def test_eval_with_a_damaged_model_file(tmp_path, capsys, kind):
    write_inputs(tmp_path / "inputs")
    damage(tmp_path / "inputs" / "tiny" / "model.safetensors", kind, tmp_path)
    argv = ["eval", "--model", str(tmp_path / "inputs" / "tiny"), "--tasks", "mmlu", "--limit", "1"]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert_one_error_line(capsys, "model.safetensors")
    assert_nothing_left(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("kind", KINDS)
def test_eval_with_a_damaged_data_file(tmp_path, capsys, kind):
    inputs = tmp_path / "inputs"
    write_inputs(inputs)
    damage(inputs / "wmdp-bio.jsonl", kind, tmp_path)
    argv = ["eval", "--model", str(inputs / "tiny"), "--tasks", "wmdp_bio", "--data-dir", str(inputs)]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert_one_error_line(capsys, "wmdp-bio")
    assert_nothing_left(tmp_path, tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# --resume


def resume_copy(finished_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, symlinks=True)
    return out


def snapshot(folder: Path) -> dict[str, bytes | str]:
    return {
        str(p.relative_to(folder)): (str(p.readlink()) if p.is_symlink() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_symlink() or p.is_file()
    }


@pytest.mark.parametrize("kind", KINDS)
def test_resume_with_a_damaged_status(finished_run, tmp_path, capsys, kind):
    out = resume_copy(finished_run, tmp_path)
    damage(out / STATUS_FILE, kind, tmp_path)
    before = snapshot(out)
    assert cli.main(["run", "--out", str(out), "--resume"]) == 2
    assert_one_error_line(capsys, STATUS_FILE)
    assert snapshot(out) == before


@pytest.mark.parametrize("kind", rows(KINDS))
def test_resume_with_a_damaged_saved_config(finished_run, tmp_path, capsys, kind):
    out = resume_copy(finished_run, tmp_path)
    damage(out / "config.yaml", kind, tmp_path)
    before = snapshot(out)
    assert cli.main(["run", "--out", str(out), "--resume"]) == 2
    assert_one_error_line(capsys, "config.yaml")
    assert snapshot(out) == before


@pytest.mark.parametrize("kind", rows(KINDS))
def test_resume_with_a_damaged_latest_pointer(finished_run, tmp_path, capsys, kind):
    out = resume_copy(finished_run, tmp_path)
    [latest] = out.rglob("latest")
    damage(latest, kind, tmp_path)
    assert cli.main(["run", "--out", str(out), "--resume"]) == 2
    assert_one_error_line(capsys, "latest")
    assert not list(out.rglob(LOCK_FILE))


# ----------------------------------------------------------------------------------------------
# --overwrite through the command line (items 2, 3, 7, 10)


def test_overwrite_with_a_typo_keeps_the_previous_run(finished_run, tmp_path, capsys):
    out = resume_copy(finished_run, tmp_path)
    before = snapshot(out)
    config = out / "config.yaml"
    assert cli.main(["run", str(config), "--out", str(out), "--overwrite", "data.forget=typo.jsonl"]) == 2
    assert_one_error_line(capsys, "typo.jsonl")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_overwrite_of_the_current_directory_or_a_project_is_refused(
    finished_run, tmp_path, capsys, monkeypatch
):
    out = resume_copy(finished_run, tmp_path)
    before = snapshot(out)
    monkeypatch.chdir(out)
    assert cli.main(["run", "config.yaml", "--out", ".", "--overwrite"]) == 2
    assert_one_error_line(capsys, "current directory")
    assert snapshot(out) == before
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("name: mine\n")
    (project / "results.json").write_text("{}")
    assert cli.main(["run", "config.yaml", "--out", str(project), "--overwrite"]) == 2
    assert_one_error_line(capsys, "not a retainfirst output directory")
    assert sorted(p.name for p in project.iterdir()) == ["config.yaml", "results.json"]


def test_overwrite_with_resume_is_refused_on_a_finished_run(finished_run, tmp_path, capsys):
    out = resume_copy(finished_run, tmp_path)
    before = snapshot(out)
    assert cli.main(["run", "--out", str(out), "--overwrite", "--resume"]) == 2
    assert_one_error_line(capsys, "--overwrite and --resume")
    assert snapshot(out) == before


def test_a_name_with_dotdot_does_not_escape_runs(tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    config = write_inputs(tmp_path / "inputs")
    config.write_text(config.read_text().replace("name: tiny", "name: ../../escaped"))
    assert cli.main(["run", str(config)]) == 2
    assert_one_error_line(capsys, "single folder name")
    assert not (tmp_path / "escaped").exists()


def test_an_lm_eval_task_file_with_python_is_refused(tmp_path, capsys):
    inputs = tmp_path / "inputs"
    write_inputs(inputs)
    (inputs / "utils.py").write_text(
        f"open({str(tmp_path / 'ran')!r}, 'w').write('code ran')\ndef f(x): return x\n"
    )
    task = inputs / "task.yaml"
    task.write_text("task: evil\nprocess_docs: !function utils.f\n")
    argv = [
        "eval",
        "--model",
        str(inputs / "tiny"),
        "--tasks",
        f"lm_eval:{task}",
        "--out",
        str(tmp_path / "out"),
    ]
    assert cli.main(argv) == 2
    line = assert_one_error_line(capsys, str(task))
    assert "!function" in line and "lm_eval_allow_code" in line
    assert not (tmp_path / "ran").exists()
    assert_nothing_left(tmp_path, tmp_path / "out")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("retainfirst ") and out.split()[1][0].isdigit()


def test_an_os_error_about_a_user_path_is_one_line_and_a_bug_is_not_hidden(tmp_path, capsys, monkeypatch):
    from retainfirst.experiment.rundir import RunDir

    config = write_inputs(tmp_path / "inputs")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out"))

    monkeypatch.setattr(RunDir, "open", denied)
    assert cli.main(["run", str(config), "--out", str(tmp_path / "out")]) == 2
    assert "Permission denied" in assert_one_error_line(capsys, str(tmp_path / "out"))

    def bug(*args, **kwargs):
        raise OSError("an internal failure that names no file")

    monkeypatch.setattr(RunDir, "open", bug)
    with pytest.raises(OSError, match="names no file"):
        cli.main(["run", str(config), "--out", str(tmp_path / "out")])
