"""metrics.jsonl: one JSON object per logged optimizer step, flushed immediately.

A plain file writer (no logging handlers): a killed run loses at most the line being written, and
a resumed run first drops the lines of steps after its checkpoint so every step appears once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from retainfirst.engine.tracking import finish_trackers, scalars
from retainfirst.io import atomic_write_text


def _jsonable(value: Any) -> Any:
    """Floats that JSON cannot hold (NaN, inf) become null; tensors and numpy scalars become floats."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends records to ``path`` (main process only; other ranks get a writer that does nothing).

    With an ``accelerator`` whose trackers were started (``init_trackers``), every record also goes
    to them, with the same numbers and its ``step``; :meth:`close` finishes those trackers.
    """

    def __init__(self, path: Path, enabled: bool = True, accelerator: Any = None) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8") if enabled else None  # noqa: SIM115 - closed in close()
        self._accelerator = accelerator if enabled and getattr(accelerator, "trackers", None) else None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        if self._accelerator is not None:
            self._accelerator.log(scalars(record), step=record.get("step"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._accelerator is not None:
            accelerator, self._accelerator = self._accelerator, None
            finish_trackers(accelerator)


def truncate_after(path: Path, step: int) -> None:
    """Keep only records with ``step <= step`` (and drop a half-written last line), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
