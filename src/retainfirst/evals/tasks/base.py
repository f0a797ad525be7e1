"""The evaluation-task plugin API: what a task loads, how it runs, and what its numbers mean.

A task is a class registered by name (``@register_task``). The runner asks it to ``prepare`` its
data once per directory (from the run's config, through a :class:`TaskContext`) and to ``run`` on
the model before unlearning and after each sub-run. The report reads each task's *headlines*: which
results feed which headline number, whether that number measures forgetting, retained utility or is
a diagnostic, and whether higher is better. Nothing above ``evals/`` knows task names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from retainfirst.errors import RetainFirstError
from retainfirst.evals.results import EvalResult

if TYPE_CHECKING:
    from retainfirst.config import EvalConfig, RunConfig

Role = Literal["forget", "utility", "diagnostic"]
ROLES: tuple[Role, ...] = ("forget", "utility", "diagnostic")


@dataclass(frozen=True)
class Headline:
    """One headline number of a run, computed from the results a task claims.

    ``role``: ``forget`` numbers make the forget score (lower = more forgotten), ``utility`` numbers
    are compared with the ``before`` model (recovery %), ``diagnostic`` numbers are only shown.
    ``pool``: several results feed the number (e.g. the probe levels): their mean weighted by ``n``.
    ``precedence``: the forget score is the mean of the forget headlines of the highest precedence
    present (probe recall before WMDP accuracy).
    """

    key: str  # name in results.json "metrics" (e.g. "forget", "mmlu", "ppl")
    role: Role
    metric: str  # key inside EvalResult.metrics
    higher_is_better: bool
    label: str = ""  # table header; default: the key
    fmt: str = "{:.3f}"
    pool: bool = False
    precedence: int = 0
    description: str = ""  # one line for summary.md

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"headline {self.key!r}: role {self.role!r} is not one of {', '.join(ROLES)}")
        if self.role == "forget" and self.higher_is_better:
            raise ValueError(
                f"headline {self.key!r}: forget numbers must be lower-is-better (forget score axis)"
            )

    @property
    def title(self) -> str:
        return self.label or self.key

    def value_of(self, result: EvalResult) -> float | None:
        value = result.metrics.get(self.metric)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return None


@dataclass
class TaskContext:
    """What ``EvalTask.prepare`` may read: the run's config, the model, where to save copies of data,
    the training texts (empty for ``retainfirst eval``), and shared sources built once on first use
    (``context.source("facts")`` is the facts benchmark), so two tasks never build one twice."""

    config: RunConfig
    model: Any
    tokenizer: Any
    workdir: Path | None = None
    training: bool = False
    forget_texts: list[str] = field(default_factory=list)
    retain_texts: list[str] = field(default_factory=list)
    builders: Mapping[str, Callable[[TaskContext], Any]] = field(default_factory=dict)
    wanted: set[str] = field(default_factory=set)  # sources the run uses (training data or a task)
    _built: dict[str, Any] = field(default_factory=dict, repr=False)

    def source(self, name: str) -> Any:
        if name not in self._built:
            if name not in self.builders:
                raise RetainFirstError(f"no shared data source {name!r}; known: {', '.join(self.builders)}")
            self._built[name] = self.builders[name](self)
        return self._built[name]

    def uses(self, name: str) -> bool:
        """Whether the run uses the source at all (the training data or some task needs it)."""
        return name in self.wanted or name in self._built

    def data_path(self, name: str) -> str:
        """A data file relative to ``data.dir`` when it exists there, else as given (path or hub id)."""
        base = self.config.data.dir
        if base and not Path(name).is_absolute():
            candidate = Path(base) / name
            if candidate.exists():
                return str(candidate)
        return name

    def load_texts(self, name: str | None) -> list[str]:
        from retainfirst.data import load_texts

        data = self.config.data
        return load_texts(self.data_path(name or ""), field=data.text_field, config=data.hub_config)


class EvalTask:
    """Base class of evaluation tasks. Subclasses set the class variables and implement
    ``prepare`` and ``run``; see docs/architecture.md ("Add an evaluation task")."""

    name: ClassVar[str]
    role: ClassVar[Role]
    headline: ClassVar[str]  # metric key of the task's headline number
    higher_is_better: ClassVar[bool]
    label: ClassVar[str] = ""  # table header of that number (default: the name)
    description: ClassVar[str] = ""
    parametrised: ClassVar[bool] = False  # named "<name>:<param>" (e.g. lm_eval:arc_easy)

    def __init__(self, param: str | None = None) -> None:
        if self.parametrised and not param:
            raise RetainFirstError(f"task {self.name!r} needs a parameter: write {self.name}:<task>")
        if not self.parametrised and param:
            raise RetainFirstError(f"task {self.name!r} takes no parameter (got {self.name}:{param})")
        self.param = param

    @property
    def id(self) -> str:
        """The name as written in ``eval.tasks``."""
        return f"{self.name}:{self.param}" if self.param else self.name

    # -- metadata read by the report ------------------------------------------------------------
    def headlines(self) -> list[Headline]:
        """The headline numbers of this task (default: one, named after the task)."""
        return [
            Headline(
                self.id,
                self.role,
                self.headline,
                self.higher_is_better,
                label=self.label or self.id,
                description=self.description,
            )
        ]

    def headline_for(self, result: EvalResult) -> Headline | None:
        """The headline a result of this task feeds (None: not one of this task's results)."""
        return self.headlines()[0] if result.task == self.id else None

    # -- what the runner calls ------------------------------------------------------------------
    def check_config(self, config: RunConfig) -> None:
        """Raise RetainFirstError when the config cannot feed this task (e.g. no data folder)."""

    def sources(self, config: RunConfig) -> set[str]:
        """Shared sources (``TaskContext.builders``) this task reads."""
        return set()

    def prepare(self, context: TaskContext) -> Any:
        """Load this task's data (once per run directory)."""
        raise NotImplementedError

    def describe(self, data: Any) -> str:
        """A few words for the progress line, e.g. ``40 questions``."""
        return f"{len(data)} items" if isinstance(data, Sequence) else ""

    def run(self, model: Any, tokenizer: Any, data: Any, settings: EvalConfig) -> list[EvalResult]:
        """Score ``model`` on ``data``; ``settings`` is the config's ``eval`` section."""
        raise NotImplementedError


def limited(items: Sequence[Any], limit: int | None) -> list[Any]:
    """The first ``limit`` items (all when None)."""
    return list(items[:limit] if limit else items)


def pooled(values: Sequence[tuple[float | None, int]]) -> float | None:
    """Mean over all items of several results (each result's mean weighted by its ``n``)."""
    total, count = 0.0, 0
    for value, n in values:
        if value is None or not math.isfinite(value) or n <= 0:
            continue
        total += value * n
        count += n
    return total / count if count else None
