"""Evidence settings of a run directory: seeds, evaluation during training and the stopping rule.

The config fields are read with defaults, so a config without them runs as before:

- ``seeds`` (list of ints, default None): every sub-run is trained once per seed (``train.seed``),
  named ``<name>-s<seed>``; the report aggregates the seeds of a configuration;
- ``eval.eval_every`` (int, default 0; 1 when a stop level is set): in-run evaluation of the
  forget probes every N optimizer steps (and after the last), logged as ``eval/forget`` in
  ``metrics.jsonl``;
- ``eval.during_limit`` (int, default None = all): items per forget probe set in those evaluations;
- ``stop.forget_below`` (float, default None): stop a sub-run at its first in-run evaluation whose
  forget score is at or below this level; the runs are then compared at that matched level;
- ``eval.bootstrap_resamples`` (2000), ``eval.confidence`` (0.95), ``eval.significance`` (0.05),
  ``eval.bootstrap_seed`` (0): the report's statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from retainfirst import config as cfgmod
from retainfirst.config import RunConfig, SubRun
from retainfirst.errors import RetainFirstError
from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import EvalTask
from retainfirst.evals.tasks.base import limited


@dataclass(frozen=True)
class EvidenceSettings:
    seeds: list[int] | None = None
    eval_every: int = 0
    during_limit: int | None = None
    forget_below: float | None = None
    resamples: int = 2000
    confidence: float = 0.95
    significance: float = 0.05
    bootstrap_seed: int = 0

    @property
    def evaluates_during_training(self) -> bool:
        return self.eval_every > 0 or self.forget_below is not None

    @property
    def every(self) -> int:
        """Steps between in-run evaluations (every step when stopping at a level and none is given)."""
        return self.eval_every or (1 if self.forget_below is not None else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: RunConfig) -> EvidenceSettings:
        """Read the fields (see the module docstring); a bad value is a one-line RetainFirstError."""
        ev = config.eval
        settings = cls(
            seeds=None if config.seeds is None else list(config.seeds),
            eval_every=ev.eval_every,
            during_limit=ev.during_limit,
            forget_below=config.stop.forget_below,
            resamples=ev.bootstrap_resamples,
            confidence=ev.confidence,
            significance=ev.significance,
            bootstrap_seed=ev.bootstrap_seed,
        )
        settings.check()
        return settings

    def check(self) -> None:
        if self.seeds is not None and (
            not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0
        ):
            raise RetainFirstError(f"config: seeds={self.seeds} must be distinct non-negative integers")
        if self.eval_every < 0:
            raise RetainFirstError(f"config: eval.eval_every={self.eval_every} must be >= 0")
        if self.during_limit is not None and self.during_limit < 1:
            raise RetainFirstError(f"config: eval.during_limit={self.during_limit} must be >= 1")
        if self.forget_below is not None and not (
            math.isfinite(self.forget_below) and self.forget_below >= 0
        ):
            raise RetainFirstError(f"config: stop.forget_below={self.forget_below} must be a number >= 0")
        if self.resamples < 100:
            raise RetainFirstError(f"config: eval.bootstrap_resamples={self.resamples} must be >= 100")
        for key, value in (("confidence", self.confidence), ("significance", self.significance)):
            if not 0 < value < 1:
                raise RetainFirstError(f"config: eval.{key}={value} must be between 0 and 1")


def with_seeds(plan: Sequence[SubRun], seeds: Sequence[int] | None) -> list[SubRun]:
    """Each sub-run once per seed (``train.seed``), named ``<name>-s<seed>`` with ``seed`` in its settings."""
    if not seeds:
        return list(plan)
    return [
        cfgmod.with_changes(
            sub,
            name=f"{sub.name}-s{seed}",
            train=cfgmod.with_changes(sub.train, seed=seed),
            settings={**sub.settings, "seed": seed},
        )
        for sub in plan
        for seed in seeds
    ]


def forget_tasks(tasks: Sequence[EvalTask]) -> list[EvalTask]:
    """The tasks with a forget-role headline (the cheap in-run evaluation)."""
    return [t for t in tasks if any(h.role == "forget" for h in t.headlines())]


def forget_part(task: EvalTask, data: Any, limit: int | None) -> Any:
    """The part of a task's prepared data that feeds its forget headline, at most ``limit`` items per
    set: probe sets (``{"probes": {set: [...]}}``) whose results the task maps to a forget headline,
    a plain list cut to ``limit``; other data is used whole."""
    if isinstance(data, dict) and isinstance(data.get("probes"), dict):
        probes = data["probes"]
        forget = {}
        for name, items in probes.items():
            headline = task.headline_for(EvalResult(name, {}, 0))
            if headline is not None and headline.role == "forget":
                forget[name] = limited(items, limit)
        return {**data, "probes": forget or {n: limited(p, limit) for n, p in probes.items()}}
    if isinstance(data, list):
        return limited(data, limit)
    return data


def forget_callback(
    config: RunConfig,
    tokenizer: Any,
    tasks: Sequence[EvalTask],
    task_data: dict[str, Any],
    settings: EvidenceSettings,
) -> Callable[[int, Any], dict[str, Any]]:
    """``callback(step, model)`` for ``engine.unlearn``: the forget score (as the report computes it)
    on the forget tasks' probes, each forget headline, and ``stop`` once at or below the level."""
    from retainfirst.report import forget_score, headline_catalogue, headline_metrics

    chosen = forget_tasks(tasks)
    if not chosen:
        raise RetainFirstError(
            "evaluation during training (eval.eval_every / stop.forget_below) needs a forget task in "
            "eval.tasks (e.g. facts)"
        )
    data = {t.id: forget_part(t, task_data[t.id], settings.during_limit) for t in chosen}
    headlines = headline_catalogue(chosen)

    def callback(step: int, model: Any) -> dict[str, Any]:
        model.eval()
        results: list[EvalResult] = []
        for task in chosen:
            results.extend(task.run(model, tokenizer, data[task.id], config.eval))
        metrics = headline_metrics(results, chosen)
        score = forget_score(metrics, headlines)
        numbers: dict[str, Any] = {"forget": score, "items": sum(r.n for r in results)}
        numbers |= {h.key: metrics[h.key] for h in headlines if h.key in metrics and h.key not in numbers}
        level = settings.forget_below
        if level is not None and math.isfinite(score) and score <= level:
            numbers["stop"] = True
        return numbers

    return callback
