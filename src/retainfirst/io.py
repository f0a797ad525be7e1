"""File I/O shared by every layer: atomic writes (unique temporary names), JSON-safe floats, JSONL."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_safe(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null instead of producing invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def atomic_write_json(path: str | Path, data: Any) -> Path:
    text = json.dumps(json_safe(data), indent=2, allow_nan=False, default=str)
    return atomic_write_text(path, text + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one per line; a missing file is empty, a torn last line skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_user_text(path: str | Path, what: str = "file", *, fix: str = "check the file") -> str:
    """The UTF-8 text of a file the user supplied; every failure is a one-line RetainFirstError.

    ``what`` names the file's role in the message ("config file", "data file", ...) and ``fix`` says
    what to do; a dangling symbolic link, a folder, unreadable bytes and non-UTF-8 text are all named.
    """
    from retainfirst.errors import RetainFirstError

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if path.is_symlink():
            raise RetainFirstError(
                f"{what} {path} is a symbolic link to {os.readlink(path)}, which does not exist; {fix}"
            ) from None
        raise RetainFirstError(f"{what} {path} does not exist; {fix}") from None
    except IsADirectoryError:
        raise RetainFirstError(f"{what} {path} is a folder, not a file; {fix}") from None
    except OSError as exc:
        raise RetainFirstError(f"cannot read {what} {path}: {exc.strerror or exc}; {fix}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RetainFirstError(
            f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            f"save it as UTF-8 or pass the right file"
        ) from None
