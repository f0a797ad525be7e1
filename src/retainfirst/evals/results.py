"""One JSON-serialisable results structure for every evaluation.

Every result records the protocol that produced it (shots, scoring mode, prompt format, dataset
sizes, ...) in ``settings`` so numbers are never read without knowing how they were made.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EvalResult:
    """Result of one evaluation task.

    Attributes:
        task: task name, e.g. ``"mmlu"``, ``"wmdp_bio"``, ``"rwku_forget_l1"``, ``"mia"``.
        metrics: headline numbers, e.g. ``{"acc": 0.41, "acc_stderr": 0.01}`` (fractions, not %).
        n: number of items scored.
        settings: the protocol: shots, scoring mode, prompt format, limit, sizes, model, seed.
        breakdown: per-subject / per-level numbers, ``{group: {metric: value}}``.
        samples: optional per-item records (kept small; omitted from summaries).
    """

    task: str
    metrics: dict[str, float]
    n: int
    settings: dict[str, Any] = field(default_factory=dict)
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, include_samples: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not include_samples:
            data.pop("samples")
        return _finite_or_none(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        return cls(
            task=data["task"],
            metrics=dict(data["metrics"]),
            n=int(data["n"]),
            settings=dict(data.get("settings", {})),
            breakdown={k: dict(v) for k, v in data.get("breakdown", {}).items()},
            samples=list(data.get("samples", [])),
        )


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null rather than producing invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def save_results(results: list[EvalResult], path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write results atomically (temp file + rename) as ``{"results": [...], **extra}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**(extra or {}), "results": [r.to_dict() for r in results]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite_or_none(payload), indent=2, sort_keys=False))
    tmp.replace(path)
    return path


def load_results(path: str | Path) -> list[EvalResult]:
    data = json.loads(Path(path).read_text())
    return [EvalResult.from_dict(r) for r in data["results"]]
