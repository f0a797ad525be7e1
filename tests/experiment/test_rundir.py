"""RunDir safety (issue 14): what --overwrite may delete, when, and the lock of a run directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from retainfirst.errors import RetainFirstError
from retainfirst.experiment.rundir import (
    LOCK_FILE,
    STATUS_FILE,
    RunDir,
    close_open_rundirs,
    default_out_dir,
)

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(autouse=True)
def _release_locks():
    yield
    close_open_rundirs()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (what must survive a refused command)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def make_run(folder: Path, command: str = "run") -> dict[str, bytes]:
    folder.mkdir(parents=True)
    (folder / STATUS_FILE).write_text(json.dumps({"command": command, "state": "done", "runs": {}}))
    (folder / "results.json").write_text('{"old": true}')
    (folder / "runs").mkdir()
    (folder / "runs" / "metrics.jsonl").write_text('{"step": 1}\n')
    return snapshot(folder)


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


# ----------------------------------------------------------------------------------------------
# What --overwrite may delete


@pytest.mark.parametrize(
    "files",
    [
        {"config.yaml": b"name: my-project\n"},  # a project folder with a config
        {"results.json": b"{}"},  # only a results.json
        {STATUS_FILE: b"\x89\xff binary"},
        {STATUS_FILE: b"[1, 2]"},
        {STATUS_FILE: b'{"command": "rm -rf"}'},
        {STATUS_FILE: b""},
    ],
)
def test_overwrite_refuses_folders_that_are_not_runs(tmp_path, files):
    folder = tmp_path / "project"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_bytes(text)
    (folder / "thesis.tex").write_text("years of work")
    before = snapshot(folder)
    with pytest.raises(RetainFirstError, match="not a retainfirst output directory"):
        RunDir.open(folder, command="run", overwrite=True, resume=False)
    assert snapshot(folder) == before
    assert siblings(folder) == ["project"]


def test_overwrite_never_touches_cwd_its_parents_home_or_root(tmp_path, monkeypatch):
    run = tmp_path / "home" / "me" / "work"
    before = make_run(run)
    monkeypatch.setenv("HOME", str(tmp_path / "home" / "me"))
    monkeypatch.chdir(run)
    for out in (".", run, "..", tmp_path, Path.home(), "/"):
        with pytest.raises(RetainFirstError, match=r"current directory|home directory|root directory"):
            RunDir.open(out, command="run", overwrite=True, resume=False)
    # even a run directory that is the current directory is not replaced (nor resumed) from inside
    with pytest.raises(RetainFirstError, match="is the current directory"):
        RunDir.open(".", command="run", overwrite=False, resume=True)
    assert snapshot(run) == before
    assert siblings(run) == ["work"]


def test_symlinked_out_is_refused_with_one_line(tmp_path):
    real = tmp_path / "real"
    before = make_run(real)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(RetainFirstError, match=r"symbolic link \(to .*real\); pass the directory itself"):
        RunDir.open(link, command="run", overwrite=True, resume=False)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(RetainFirstError, match="which does not exist"):
        RunDir.open(dangling, command="run", overwrite=False, resume=False)
    assert snapshot(real) == before
    assert not (tmp_path / "nowhere").exists()


def test_overwrite_and_resume_together_are_refused(tmp_path):
    before = make_run(tmp_path / "run")
    with pytest.raises(RetainFirstError, match="--overwrite and --resume exclude each other"):
        RunDir.open(tmp_path / "run", command="run", overwrite=True, resume=True)
    assert snapshot(tmp_path / "run") == before


def test_overwrite_sets_the_old_run_aside_and_discard_puts_it_back(tmp_path, capsys):
    out = tmp_path / "run"
    before = make_run(out)
    rundir = RunDir.open(out, command="run", overwrite=True, resume=False)
    # the new directory is fresh and locked; the old run waits next to it, untouched
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, STATUS_FILE]
    assert rundir.replaced is not None and rundir.replaced.parent == tmp_path
    assert rundir.replaced.name.startswith(".run.replaced-")
    assert {k: v for k, v in snapshot(rundir.replaced).items() if k != LOCK_FILE} == before
    (out / "config.yaml").write_text("new")
    rundir.discard()  # the new command failed its checks
    assert snapshot(out) == before
    assert siblings(out) == ["run"]


def test_confirm_overwrite_deletes_the_old_run_only_then(tmp_path):
    out = tmp_path / "run"
    make_run(out, command="eval")
    with RunDir.open(out, command="run", overwrite=True, resume=False) as rundir:
        aside = rundir.replaced
        assert aside is not None and aside.is_dir()
        rundir.confirm_overwrite()
        assert not aside.exists()
    assert siblings(out) == ["run"]
    assert json.loads((out / STATUS_FILE).read_text())["command"] == "run"
    assert not (out / LOCK_FILE).exists()


def test_close_without_confirm_keeps_the_old_run(tmp_path, capsys):
    out = tmp_path / "run"
    before = make_run(out)
    rundir = RunDir.open(out, command="run", overwrite=True, resume=False)
    aside = rundir.replaced
    rundir.close()
    assert snapshot(aside) == before  # its lock is gone, every file of the old run is there
    assert "is kept in" in capsys.readouterr().err


def test_discard_of_a_fresh_directory_leaves_nothing(tmp_path):
    out = tmp_path / "a" / "b"
    rundir = RunDir.open(out, command="eval", overwrite=False, resume=False)
    assert json.loads((out / STATUS_FILE).read_text())["command"] == "eval"
    rundir.discard()
    assert not out.exists()


def test_resume_with_a_damaged_status_is_one_line_naming_it(tmp_path):
    out = tmp_path / "run"
    make_run(out)
    for text in (b"\xff\xfe\x00", b"", b'{"command": "run", "runs": [', b"[]"):
        (out / STATUS_FILE).write_bytes(text)
        with pytest.raises(RetainFirstError) as info:
            RunDir.open(out, command="run", overwrite=False, resume=True)
        assert str(info.value).count("\n") == 0 and str(out / STATUS_FILE) in str(info.value)


# ----------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("name", ["..", "../outside", "a/b", "/etc", ".hidden", "", " x", "a\\b", "x\ny"])
def test_default_out_dir_refuses_names_that_are_not_one_folder(name):
    with pytest.raises(RetainFirstError, match="single folder name"):
        default_out_dir(name)


def test_default_out_dir_is_under_runs():
    assert default_out_dir("tiny-1.v2") == Path("runs") / "tiny-1.v2"


# ----------------------------------------------------------------------------------------------
# The lock


def test_lock_records_owner_and_is_released_on_exceptions(tmp_path):
    out = tmp_path / "run"
    opened = RunDir.open(out, command="run", overwrite=False, resume=False)
    with pytest.raises(RuntimeError, match="boom"), opened:
        record = json.loads((out / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["command"] == "run" and record["started"] and record["token"]
        with pytest.raises(RetainFirstError, match=rf"in use by pid {os.getpid()} on "):
            RunDir.open(out, command="run", overwrite=False, resume=True)
        raise RuntimeError("boom")
    assert not (out / LOCK_FILE).exists()
    RunDir.open(out, command="run", overwrite=False, resume=True).close()


HOLDER = """
import sys, time
from retainfirst.experiment.rundir import RunDir
rundir = RunDir.open(sys.argv[1], command="run", overwrite=False, resume=True)
print("locked", flush=True)
time.sleep(60)
"""


def test_two_resumes_cannot_run_at_once_and_a_killed_holder_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    make_run(out)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RetainFirstError, match=rf"in use by pid {holder.pid} on {socket.gethostname()}"):
            RunDir.open(out, command="run", overwrite=False, resume=True)
        with pytest.raises(RetainFirstError, match=rf"in use by pid {holder.pid}"):
            RunDir.open(out, command="run", overwrite=True, resume=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid  # left behind by SIGKILL
    capsys.readouterr()
    with RunDir.open(out, command="run", overwrite=False, resume=True) as rundir:
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        rundir.save()
    err = capsys.readouterr().err
    assert f"taking over the lock of {out}: pid {holder.pid}" in err and "no longer running" in err


def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path, capsys):
    out = tmp_path / "run"
    make_run(out)
    stale = {"pid": os.getpid(), "host": socket.gethostname(), "command": "run", "started": "then"}
    (out / LOCK_FILE).write_text(json.dumps({**stale, "process_start": "1", "token": "old"}))
    RunDir.open(out, command="run", overwrite=False, resume=True).close()
    assert "taking over" in capsys.readouterr().err


def test_a_lock_from_another_host_or_a_damaged_lock_is_never_guessed_about(tmp_path):
    out = tmp_path / "run"
    before = make_run(out)
    (out / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "t", "token": "x"}))
    with pytest.raises(RetainFirstError, match=r"locked by pid 1 on elsewhere .* delete .*retry"):
        RunDir.open(out, command="run", overwrite=True, resume=False)
    (out / LOCK_FILE).write_bytes(b"\x00\xff")
    with pytest.raises(RetainFirstError, match=r"lock file .* is damaged"):
        RunDir.open(out, command="run", overwrite=False, resume=True)
    assert {k: v for k, v in snapshot(out).items() if k != LOCK_FILE} == before


def test_a_writer_that_lost_its_lock_stops(tmp_path):
    out = tmp_path / "run"
    rundir = RunDir.open(out, command="run", overwrite=False, resume=False)
    (out / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "other", "token": "theirs"}))
    with pytest.raises(RetainFirstError, match="lost the lock"):
        rundir.mark("before", "running")
    rundir.close()
    assert json.loads((out / LOCK_FILE).read_text())["token"] == "theirs"  # never removes another's lock


def test_follow_takes_no_lock(tmp_path):
    out = tmp_path / "run"
    make_run(out)
    with RunDir.open(out, command="run", overwrite=False, resume=True):
        follower = RunDir.follow(out, resume=True)
        assert follower.status["command"] == "run"
        follower.close()
        assert (out / LOCK_FILE).exists()
