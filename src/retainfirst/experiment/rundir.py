"""Run directories: never silently overwritten, locked while written, state on disk in ``status.json``.

Safety rules (issue 14):

- ``--overwrite`` replaces only a retainfirst run: a directory whose ``status.json`` parses and names a
  retainfirst command (run, sweep, eval). Never the current directory, one of its parents, the home
  directory or ``/``; never through a symbolic link.
- The old run is renamed aside (``.<name>.replaced-<time>`` next to it) and deleted only when the runner
  calls :meth:`RunDir.confirm_overwrite`, i.e. once the new command has passed its checks;
  :meth:`RunDir.discard` puts it back.
- A command that writes a directory holds its lock file ``.retainfirst.lock`` (JSON: pid, host,
  command, started, process_start, token), created atomically. A live holder on this host makes
  ``open`` fail with one line; a dead one (SIGKILL, power loss) is taken over with a message; a holder
  on another host is never guessed about.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
import weakref
from pathlib import Path
from typing import Any

from retainfirst.errors import RetainFirstError
from retainfirst.io import atomic_write_json, read_user_text

PROG = "retainfirst"
STATUS_FILE = "status.json"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".retainfirst.lock"
COMMANDS = ("run", "sweep", "eval")
REPLACED_MARK = ".replaced-"

# RunDirs of this process that still hold a lock: main() closes them all as a last resort.
_OPEN: weakref.WeakSet[RunDir] = weakref.WeakSet()


# ----------------------------------------------------------------------------------------------
# Names and locations


def default_out_dir(name: str, root: str | Path = "runs") -> Path:
    """``runs/<name>``, for a ``name`` that is one plain folder name (no ``..``, separators or dot start)."""
    bad = (
        not isinstance(name, str)
        or not name.strip()
        or name != name.strip()
        or name.startswith(".")
        or any(sep in name for sep in ("/", "\\", "\0"))
        or any(ord(ch) < 32 for ch in name)
    )
    if bad:
        raise RetainFirstError(
            f"config: name {name!r} must be a single folder name (no '/', '\\', '..' or leading '.'), "
            f"since the default output folder is {Path(root) / '<name>'}; rename it or pass --out DIR"
        )
    return Path(root) / name


def _check_location(path: Path) -> None:
    """Refuse symbolic links and the folders whose loss no one could want (cwd, its parents, home, /)."""
    if path.is_symlink():
        target = os.readlink(path)
        if not path.exists():
            raise RetainFirstError(
                f"--out {path} is a symbolic link to {target}, which does not exist; pass a real directory"
            )
        raise RetainFirstError(
            f"--out {path} is a symbolic link (to {target}); pass the directory itself "
            f"(--out {path.resolve()}) so it is clear what is written or replaced"
        )
    resolved = path.resolve()
    protected: dict[Path, str] = {Path(resolved.anchor): "the root directory"}
    with contextlib.suppress(OSError, RuntimeError):
        home = Path.home().resolve()
        protected |= {parent: "a parent of your home directory" for parent in home.parents}
        protected[home] = "your home directory"
    with contextlib.suppress(OSError):
        cwd = Path.cwd().resolve()
        protected |= {parent: "a parent of the current directory" for parent in cwd.parents}
        protected[cwd] = "the current directory"
    if resolved in protected:
        raise RetainFirstError(
            f"--out {path} is {protected[resolved]}; choose a new subfolder such as runs/NAME"
        )
    if path.exists() and not path.is_dir():
        raise RetainFirstError(f"output path {path} exists and is not a directory")


# ----------------------------------------------------------------------------------------------
# status.json


def read_status(path: Path) -> dict[str, Any]:
    """The ``status.json`` of run directory ``path``; one-line errors naming it when missing or damaged."""
    status_path = path / STATUS_FILE
    if not status_path.is_file() and not status_path.is_symlink():
        raise RetainFirstError(f"nothing to resume in {path}: it has no {STATUS_FILE}")
    fix = "restore it from a backup, or start a new run with another --out"
    text = read_user_text(status_path, "run status", fix=fix)
    try:
        status = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RetainFirstError(
            f"run status {status_path} is damaged (not JSON: {exc.msg} at line {exc.lineno}); {fix}"
        ) from None
    if not isinstance(status, dict) or status.get("command") not in COMMANDS:
        raise RetainFirstError(
            f"run status {status_path} is damaged (no retainfirst command recorded in it); {fix}"
        )
    if not isinstance(status.get("runs", {}), dict):
        raise RetainFirstError(f"run status {status_path} is damaged (its 'runs' is not a mapping); {fix}")
    status.setdefault("runs", {})
    return status


def _run_command_of(path: Path) -> str | None:
    """The command recorded in ``path/status.json`` when it is a readable retainfirst status, else None."""
    try:
        return read_status(path)["command"]
    except RetainFirstError:
        return None


# ----------------------------------------------------------------------------------------------
# The lock file


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (Linux), to tell a reused pid from the lock's owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int, process_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    now_start = _process_start(pid)
    return not (process_start and now_start and now_start != process_start)


class DirLock:
    """``<dir>/.retainfirst.lock`` held by this process; released by :meth:`release` (or at exit)."""

    def __init__(self, directory: Path, record: dict[str, Any]) -> None:
        self.directory = directory
        self.record = record
        self._finalizer = weakref.finalize(self, _remove_lock_file, directory / LOCK_FILE, record["token"])

    @property
    def file(self) -> Path:
        return self.directory / LOCK_FILE

    @classmethod
    def acquire(cls, directory: Path, command: str) -> DirLock:
        """Create the lock atomically; take over one left by a dead process; refuse a live holder."""
        lock_path = directory / LOCK_FILE
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "started": _now(),
            "process_start": _process_start(os.getpid()),
            "token": secrets.token_hex(8),
        }
        for _ in range(5):
            if _create_exclusive(lock_path, json.dumps(record) + "\n"):
                return cls(directory, record)
            held = _read_lock(lock_path)
            if held is None:
                continue  # vanished meanwhile: try again
            if held.get("host") != record["host"]:
                raise RetainFirstError(
                    f"run directory {directory} is locked by pid {held.get('pid')} on {held.get('host')} "
                    f"since {held.get('started')}; if no retainfirst command is running there, delete "
                    f"{lock_path} and retry"
                )
            if _pid_alive(int(held["pid"]), held.get("process_start")):
                raise RetainFirstError(
                    f"run directory {directory} is in use by pid {held['pid']} on {held['host']} "
                    f"since {held.get('started')} ({PROG} {held.get('command')}); wait for it or stop it"
                )
            if _take_over(lock_path, held):
                print(
                    f"{PROG}: taking over the lock of {directory}: pid {held['pid']} "
                    f"({PROG} {held.get('command')}, started {held.get('started')}) is no longer running",
                    file=sys.stderr,
                )
        raise RetainFirstError(f"could not lock {directory}: {lock_path} keeps changing; retry")

    def held(self) -> bool:
        current = _read_lock(self.file)
        return current is not None and current.get("token") == self.record["token"]

    def release(self) -> None:
        self._finalizer()

    def moved_to(self, directory: Path) -> None:
        """The locked directory was renamed (set aside): follow it."""
        self._finalizer.detach()
        self.directory = directory
        self._finalizer = weakref.finalize(
            self, _remove_lock_file, directory / LOCK_FILE, self.record["token"]
        )


def _create_exclusive(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` only if it does not exist, with the content complete when it appears."""
    fd, tmp = _temp_next_to(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        try:
            os.link(tmp, path)  # atomic, fails if path exists
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: O_EXCL (content follows at once)
            try:
                with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w") as handle:
                    handle.write(text)
                return True
            except FileExistsError:
                return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _temp_next_to(path: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)


def _read_lock(lock_path: Path) -> dict[str, Any] | None:
    """The lock's record, None when it vanished; a damaged lock is a one-line error saying what to do."""
    try:
        text = lock_path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise _damaged_lock(lock_path, str(exc)) from None
    try:
        record = json.loads(text)
        valid = isinstance(record, dict) and int(record["pid"]) > 0
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise _damaged_lock(lock_path, "not a lock record")
    return record


def _damaged_lock(lock_path: Path, why: str) -> RetainFirstError:
    return RetainFirstError(
        f"lock file {lock_path} is damaged ({why}); if no retainfirst command is using "
        f"{lock_path.parent}, delete it and retry"
    )


def _take_over(lock_path: Path, stale: dict[str, Any]) -> bool:
    """Move a dead holder's lock away; False when it changed meanwhile (another process took it first)."""
    aside = lock_path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(lock_path, aside)
    except FileNotFoundError:
        return False
    try:
        moved = json.loads(aside.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        moved = None
    if moved != stale:  # we moved someone's fresh lock: put it back unless another one appeared
        with contextlib.suppress(OSError):
            os.link(aside, lock_path)
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def _remove_lock_file(lock_path: Path, token: str) -> None:
    """Delete the lock file if it is still ours (never another process's lock)."""
    try:
        record = json.loads(lock_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(record, dict) and record.get("token") == token and record.get("pid") == os.getpid():
        lock_path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# The run directory


class RunDir:
    """An output directory, its ``status.json`` and (for the writing process) its lock.

    Open it with :meth:`open` (main process) or :meth:`follow` (other ranks: no lock, no writes).
    Use it as a context manager, or call :meth:`close`, so the lock is released on every exit.
    """

    def __init__(self, path: Path, created: bool, status: dict[str, Any], writer: bool = True) -> None:
        self.path = path
        self.created = created
        self.status = status
        self.writer = writer  # False on the non-main processes of a multi-GPU launch: they only train
        self.resumed = False
        self.replaced: Path | None = None  # where the previous run waits until confirm_overwrite()
        self._lock: DirLock | None = None
        self._aside_lock: DirLock | None = None

    @classmethod
    def follow(cls, path: str | Path, *, resume: bool) -> RunDir:
        """A read-only view for non-main processes (the main process owns and locks the directory)."""
        path = Path(path)
        status: dict[str, Any] = {"runs": {}}
        if resume and (path / STATUS_FILE).is_file():
            status = read_status(path)
        return cls(path, created=False, status=status, writer=False)

    @classmethod
    def open(cls, path: str | Path, *, command: str, overwrite: bool, resume: bool) -> RunDir:
        """Validate ``path`` for ``command``, lock it, and (with ``overwrite``) set the old run aside."""
        if command not in COMMANDS:
            raise ValueError(f"unknown command {command!r}")
        path = Path(path)
        if overwrite and resume:
            raise RetainFirstError(
                f"--overwrite and --resume exclude each other (--overwrite replaces the run in {path}, "
                "--resume continues it); pass one"
            )
        _check_location(path)
        if resume:
            return cls._open_for_resume(path, command)
        if not path.exists():
            try:
                path.mkdir(parents=True)
            except OSError as exc:
                raise RetainFirstError(f"cannot create output directory {path}: {exc.strerror}") from None
            return cls._fresh(path, command, created=True)
        try:
            entries = {entry.name for entry in path.iterdir()}
        except OSError as exc:
            raise RetainFirstError(f"cannot read output directory {path}: {exc.strerror}") from None
        if not entries:
            return cls._fresh(path, command, created=False)
        if not overwrite:
            raise RetainFirstError(
                f"output directory {path} already exists; pass --overwrite to replace it "
                "or --resume to continue it"
            )
        if _run_command_of(path) is None:
            raise RetainFirstError(
                f"refusing to overwrite {path}: it is not a retainfirst output directory (no readable "
                f"{STATUS_FILE} naming a retainfirst command); choose another --out, or delete it yourself"
            )
        return cls._replace(path, command)

    @classmethod
    def _fresh(cls, path: Path, command: str, *, created: bool) -> RunDir:
        try:
            lock = DirLock.acquire(path, command)
        except BaseException:
            if created:
                shutil.rmtree(path, ignore_errors=True)
            raise
        rundir = cls(path, created=created, status=_new_status(command))
        rundir._lock = lock
        _OPEN.add(rundir)
        try:
            rundir.save()
        except BaseException:
            rundir.discard()
            raise
        return rundir

    @classmethod
    def _replace(cls, path: Path, command: str) -> RunDir:
        """Lock the old run, rename it aside, and start a fresh directory in its place."""
        old_lock = DirLock.acquire(path, command)
        aside = path.with_name(f".{path.name}{REPLACED_MARK}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        try:
            os.rename(path, aside)
        except OSError as exc:
            old_lock.release()
            raise RetainFirstError(f"cannot set the old run {path} aside: {exc.strerror}") from None
        old_lock.moved_to(aside)
        try:
            path.mkdir()
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.rename(aside, path)
                old_lock.moved_to(path)
            old_lock.release()
            raise RetainFirstError(f"cannot create output directory {path}: {exc.strerror}") from None
        try:
            rundir = cls._fresh(path, command, created=True)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            os.rename(aside, path)
            old_lock.moved_to(path)
            old_lock.release()
            raise
        rundir.created = False  # discard() restores the old run instead of leaving nothing
        rundir.replaced = aside
        rundir._aside_lock = old_lock
        return rundir

    @classmethod
    def _open_for_resume(cls, path: Path, command: str) -> RunDir:
        if not path.is_dir():
            raise RetainFirstError(f"nothing to resume in {path}: it does not exist")
        saved = read_status(path)["command"]
        if saved != command:
            raise RetainFirstError(f"{path} holds a `{saved}` run; continue it with `{PROG} {saved}`")
        lock = DirLock.acquire(path, command)
        try:
            status = read_status(path)  # again, now that no one else writes it
        except BaseException:
            lock.release()
            raise
        rundir = cls(path, created=False, status=status)
        rundir.resumed = True
        rundir._lock = lock
        _OPEN.add(rundir)
        return rundir

    # -- ending ---------------------------------------------------------------------------------

    def confirm_overwrite(self) -> None:
        """The new run passed its checks: delete the previous run that ``open`` set aside."""
        aside, self.replaced = self.replaced, None
        if aside is None:
            return
        if self._aside_lock is not None:
            self._aside_lock.release()
            self._aside_lock = None
        shutil.rmtree(aside, ignore_errors=True)
        if aside.exists():
            print(
                f"{PROG}: could not delete all of the replaced run {aside}; delete it yourself",
                file=sys.stderr,
            )

    def discard(self) -> None:
        """Nothing ran: remove what this invocation wrote and put a replaced run back. Then close."""
        if not self.writer:
            return
        if self.resumed:  # the user's run: never deleted here
            self.close()
            return
        if self.created or self.replaced is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        else:  # a directory that existed empty: remove only what appeared in it
            for child in self.path.iterdir():
                if child.name == LOCK_FILE:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        if self.replaced is not None:
            os.rename(self.replaced, self.path)
            if self._aside_lock is not None:
                self._aside_lock.moved_to(self.path)
            self.replaced = None
        self.close()

    def close(self) -> None:
        """Release the lock (idempotent). A replaced run not yet confirmed is kept, and said so."""
        _OPEN.discard(self)
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._aside_lock is not None:
            self._aside_lock.release()
            self._aside_lock = None
        if self.replaced is not None and self.replaced.exists():
            print(
                f"{PROG}: the previous run of {self.path} is kept in {self.replaced}; delete it once the "
                "new run is fine",
                file=sys.stderr,
            )
            self.replaced = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- status ---------------------------------------------------------------------------------

    def save(self) -> None:
        if not self.writer:
            return
        if self._lock is not None and not self._lock.held():
            raise RetainFirstError(
                f"lost the lock of {self.path} ({LOCK_FILE} was removed or taken by another process); "
                "stopping so that two commands do not write the same run"
            )
        self.status["updated"] = _now()
        atomic_write_json(self.path / STATUS_FILE, self.status)

    def state_of(self, name: str) -> str:
        return self.status["runs"].get(name, {}).get("state", "pending")

    def mark(self, name: str, state: str, **extra: Any) -> None:
        entry = self.status["runs"].setdefault(name, {})
        entry.update(state=state, **extra)
        if state != "failed":
            entry.pop("error", None)
        self.save()

    def fail(self, error: str, current: str | None) -> None:
        self.status["state"] = "failed"
        self.status["error"] = error
        if current is not None:
            self.mark(current, "failed", error=error)
        else:
            self.save()


def close_open_rundirs() -> None:
    """Release every lock this process still holds (the CLI's last resort when a command ends)."""
    for rundir in list(_OPEN):
        rundir.close()


def _new_status(command: str) -> dict[str, Any]:
    return {"command": command, "state": "running", "started": _now(), "runs": {}}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
