"""Run directories: never silently overwritten, state on disk in ``status.json``."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from retainfirst.errors import RetainFirstError
from retainfirst.io import atomic_write_json

PROG = "retainfirst"
STATUS_FILE = "status.json"
CONFIG_FILE = "config.yaml"


class RunDir:
    """An output directory and its ``status.json``.

    Opening it enforces the safety rules: an existing non-empty directory needs ``--overwrite``
    (only a previous retainfirst directory is ever deleted) or ``--resume``.
    """

    def __init__(self, path: Path, created: bool, status: dict[str, Any], writer: bool = True) -> None:
        self.path = path
        self.created = created
        self.status = status
        self.writer = writer  # False on the non-main processes of a multi-GPU launch: they only train

    @classmethod
    def follow(cls, path: str | Path, *, resume: bool) -> RunDir:
        """A read-only view for non-main processes (the main process owns the directory)."""
        path = Path(path)
        status: dict[str, Any] = {"runs": {}}
        if resume and (path / STATUS_FILE).is_file():
            status = json.loads((path / STATUS_FILE).read_text())
        return cls(path, created=False, status=status, writer=False)

    @classmethod
    def open(cls, path: str | Path, *, command: str, overwrite: bool, resume: bool) -> RunDir:
        path = Path(path)
        if overwrite and resume:
            raise RetainFirstError("--overwrite and --resume exclude each other; pass one")
        if path.exists() and not path.is_dir():
            raise RetainFirstError(f"output path {path} exists and is not a directory")
        non_empty = path.is_dir() and any(path.iterdir())
        if resume:
            status_path = path / STATUS_FILE
            if not status_path.is_file():
                raise RetainFirstError(f"nothing to resume in {path}: it has no {STATUS_FILE}")
            status = json.loads(status_path.read_text())
            saved = status.get("command")
            if saved != command:
                raise RetainFirstError(f"{path} holds a `{saved}` run; continue it with `{PROG} {saved}`")
            return cls(path, created=False, status=status)
        if non_empty:
            if not overwrite:
                raise RetainFirstError(
                    f"output directory {path} already exists; pass --overwrite to replace it "
                    "or --resume to continue it"
                )
            if not (
                (path / STATUS_FILE).is_file() or (path / CONFIG_FILE).is_file() or _is_results_dir(path)
            ):
                raise RetainFirstError(
                    f"refusing to overwrite {path}: it is not a retainfirst output directory "
                    f"(no {STATUS_FILE}); choose another --out"
                )
            shutil.rmtree(path)
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        status = {"command": command, "state": "running", "started": _now(), "runs": {}}
        return cls(path, created=created, status=status)

    def confirm_overwrite(self) -> None:
        """Called by the runner once the new run has passed its checks (config, data): only then may a
        replaced old run be removed for good. (Today ``open`` still deletes it at once.)"""

    def close(self) -> None:
        """Release the directory (its lock, once there is one)."""

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def save(self) -> None:
        if not self.writer:
            return
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

    def discard(self) -> None:
        """Remove what this invocation wrote when nothing ran (a fresh dir goes entirely)."""
        if not self.writer:
            return
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            for child in self.path.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)


def _is_results_dir(path: Path) -> bool:
    """An `eval` output directory: only results.json (and its temp files)."""
    names = {p.name for p in path.iterdir()}
    return "results.json" in names and all(n == "results.json" or n.startswith(".") for n in names)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
