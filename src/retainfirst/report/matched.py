"""Comparing runs at matched forgetting: which runs reached the level, grouped into configurations.

A run's utility only means something next to how much it forgot, so runs are compared at one
forget level. With a stopping rule (``stop.forget_below: X``) every run ends at its first in-run
evaluation at or below X (MUSE-style selection: :func:`first_at_or_below`), and its final
evaluation is the matched one; a run that never reached X is reported as such, never compared.
Without one, the level is the highest final forget score (the level every run reached) and the
comparison is flagged as not matched.

Runs that differ only by seed form a *configuration* (e.g. ``sago``, ``sum-alpha0.5``); the
configurations of one synthesizer that differ in grid settings form a *curve* (``sum (alpha grid)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

IN_RUN_FORGET = "eval/forget"  # the key of the in-run forget score in metrics.jsonl


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def first_at_or_below(
    records: Iterable[Mapping[str, Any]], level: float, key: str = IN_RUN_FORGET
) -> Mapping[str, Any] | None:
    """The first evaluated step (by step number) whose ``key`` is at or below ``level``, or None."""
    evaluated = sorted((r for r in records if _number(r.get(key))), key=lambda r: r.get("step", 0))
    return next((r for r in evaluated if r[key] <= level), None)


def in_run_evaluations(
    records: Iterable[Mapping[str, Any]], key: str = IN_RUN_FORGET
) -> list[tuple[int, float]]:
    """(step, forget score) of every in-run evaluation, in step order."""
    return sorted((int(r.get("step", 0)), float(r[key])) for r in records if _number(r.get(key)))


def common_level(final_forget_scores: Iterable[float]) -> float:
    """The forget level every run reached: the highest final forget score (NaN when none is finite)."""
    finite = [v for v in final_forget_scores if _number(v)]
    return max(finite) if finite else math.nan


@dataclass(frozen=True)
class RunOutcome:
    """Where one run stands against the matched level."""

    name: str
    reached: bool
    step: int | None  # first evaluated step at or below the level (None: no in-run evaluation)
    in_run_forget: float | None  # the in-run forget score at that step (or the last one, if not reached)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.name,
            "reached": self.reached,
            "step": self.step,
            "in_run_forget": self.in_run_forget,
        }


def outcome(name: str, records: Sequence[Mapping[str, Any]], final_forget: float, level: float) -> RunOutcome:
    """Did run ``name`` reach ``level``? From its in-run evaluations when it has any, else from its
    final (full) forget score."""
    evaluations = in_run_evaluations(records)
    if evaluations:
        hit = first_at_or_below(records, level)
        if hit is not None:
            return RunOutcome(name, True, int(hit.get("step", 0)), float(hit[IN_RUN_FORGET]))
        return RunOutcome(name, False, None, evaluations[-1][1])
    reached = _number(final_forget) and _number(level) and final_forget <= level
    return RunOutcome(name, bool(reached), None, None)


@dataclass
class Configuration:
    """Runs of one synthesizer with the same settings, one per seed."""

    label: str
    family: str
    settings: dict[str, Any]  # grid settings, without the seed
    runs: list[str] = field(default_factory=list)
    seeds: list[Any] = field(default_factory=list)
    curve: str = ""  # the family, or "<family> (<keys> grid)" when the family has several settings


def configuration_label(name: str, settings: Mapping[str, Any]) -> str:
    """The sub-run name without its seed suffix (``sago-s1`` -> ``sago``)."""
    seed = settings.get("seed")
    suffix = f"-s{seed}"
    return name[: -len(suffix)] if seed is not None and name.endswith(suffix) else name


def group_configurations(runs: Iterable[tuple[str, str, Mapping[str, Any]]]) -> list[Configuration]:
    """Group (name, family, settings) by family and settings other than ``seed``, in first-seen order,
    and name each family's curve."""
    groups: dict[str, Configuration] = {}
    for name, family, settings in runs:
        rest = {k: v for k, v in settings.items() if k != "seed"}
        key = repr((family, sorted(rest.items(), key=lambda kv: kv[0])))
        if key not in groups:
            groups[key] = Configuration(configuration_label(name, settings), family, rest)
        groups[key].runs.append(name)
        groups[key].seeds.append(settings.get("seed"))
    configs = list(groups.values())
    for family in dict.fromkeys(c.family for c in configs):
        members = [c for c in configs if c.family == family]
        varied = [k for k in dict.fromkeys(k for c in members for k in c.settings)]
        varied = [k for k in varied if len({repr(c.settings.get(k)) for c in members}) > 1]
        curve = f"{family} ({'/'.join(k.split('.')[-1] for k in varied)} grid)" if varied else family
        for c in members:
            c.curve = curve
    return configs
