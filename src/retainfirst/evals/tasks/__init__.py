"""Evaluation tasks as plugins: one module per task, each a registered :class:`EvalTask` subclass.

```python
available_tasks()               # ["facts", "lm_eval:<task>", "mia", "mmlu", ...]
task = get_task("mmlu")          # or "lm_eval:arc_easy" (a parametrised task)
register_task("my_task")(cls)    # class decorator: adding a task is one new module
check_tasks(config)              # config validation of eval.tasks (names, needed data)
```
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from retainfirst.errors import RetainFirstError
from retainfirst.evals.tasks.base import EvalTask, Headline, Role, TaskContext
from retainfirst.registry import TASKS

if TYPE_CHECKING:
    from retainfirst.config import RunConfig

PARAM_SEPARATOR = ":"

TaskClass = TypeVar("TaskClass", bound=type[EvalTask])


def register_task(name: str) -> Callable[[TaskClass], TaskClass]:
    """Class decorator that makes an :class:`EvalTask` subclass available as ``name``.

    Registering a taken name is an error, so a plugin cannot silently replace a built-in task.
    """
    key = name.strip()
    if not key or PARAM_SEPARATOR in key:
        raise RetainFirstError(f"task name {name!r} must be non-empty and contain no {PARAM_SEPARATOR!r}")

    def decorate(cls: TaskClass) -> TaskClass:
        if not (isinstance(cls, type) and issubclass(cls, EvalTask)):
            raise RetainFirstError(f"register_task({name!r}) must decorate an EvalTask subclass")
        TASKS.add(key, cls)  # a taken name is an error: a plugin cannot replace a built-in task
        cls().headlines() if not cls.parametrised else None  # metadata errors surface at import
        return cls

    return decorate


def unregister_task(name: str) -> None:
    """Remove a task (tests that register a throw-away task clean up with this)."""
    TASKS.unregister(name)


def available_tasks() -> list[str]:
    """Task names a config may list, sorted (a parametrised one shows as ``name:<task>``)."""
    return sorted(f"{k}{PARAM_SEPARATOR}<task>" if _class(k).parametrised else k for k in TASKS.available())


def task_classes() -> list[type[EvalTask]]:
    """Registered task classes in registration order (the order of the report's columns)."""
    TASKS.available()  # loads plugin entry points
    return [_class(k) for k in TASKS.registered()]


def get_task(name: str) -> EvalTask:
    """The task written as ``name`` in ``eval.tasks`` (``lm_eval:arc_easy`` gives the bridge)."""
    if not isinstance(name, str):
        raise RetainFirstError(f"task name must be a string, got {type(name).__name__}")
    key, sep, param = name.strip().partition(PARAM_SEPARATOR)
    try:
        cls = _class(key)
    except RetainFirstError:
        if key and TASKS.failed_to_load(key):
            raise  # the plugin's own load error says what is wrong
        raise RetainFirstError(
            f"{name!r} is not valid; choose one of {', '.join(available_tasks())}"
        ) from None
    if sep and not param:
        raise RetainFirstError(f"{name!r} needs a task name after {key}{PARAM_SEPARATOR}")
    return cls(param or None)


def _class(key: str) -> type[EvalTask]:
    cls = TASKS.lookup(key)
    if not (isinstance(cls, type) and issubclass(cls, EvalTask)):
        raise RetainFirstError(f"task plugin {key!r} is not an EvalTask subclass ({cls!r})")
    return cls


def get_tasks(names: Sequence[str]) -> list[EvalTask]:
    return [get_task(n) for n in names]


def check_tasks(config: RunConfig) -> None:
    """Validate ``config.eval.tasks``: known names, no duplicates, and what each task needs.

    Errors read ``config: eval.tasks[i]='wat' is not valid; choose one of ...``.
    """
    seen: set[str] = set()
    for i, name in enumerate(config.eval.tasks):
        try:
            task = get_task(name)
        except RetainFirstError as exc:
            raise RetainFirstError(f"config: eval.tasks[{i}]={exc!s}") from None
        if task.id in seen:
            raise RetainFirstError(f"config: eval.tasks lists {task.id!r} twice")
        seen.add(task.id)
        task.check_config(config)


# The built-in tasks (report columns follow role, then this registration order).
from retainfirst.evals.tasks import (  # noqa: E402,F401
    facts,
    lm_eval,
    mia,
    mmlu,
    muse,
    perplexity,
    quantize,
    relearn,
    rwku,
    tofu,
    wmdp_bio,
    wmdp_cyber,
)

__all__ = [
    "EvalTask",
    "Headline",
    "Role",
    "TaskContext",
    "available_tasks",
    "check_tasks",
    "get_task",
    "get_tasks",
    "register_task",
    "task_classes",
    "unregister_task",
]
