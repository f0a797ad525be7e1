"""Registries of forget and retain objectives, by name, with validated keyword options.

Both read the one entry-point group ``retainfirst.objectives``; an objective class says which
registry it belongs to with ``kind = "forget"`` or ``kind = "retain"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from retainfirst.objectives.base import Objective
from retainfirst.registry import Registry

_GROUP = "retainfirst.objectives"
_KINDS = ("forget", "retain")
FORGET_OBJECTIVES: Registry[type[Objective]] = Registry(
    "forget objective", _GROUP, base=Objective, kind="forget", kinds=_KINDS
)
RETAIN_OBJECTIVES: Registry[type[Objective]] = Registry(
    "retain objective", _GROUP, base=Objective, kind="retain", kinds=_KINDS
)


def register_forget_objective(name: str) -> Callable[[type], type]:
    """Class decorator: make ``get_forget_objective(name, **kwargs)`` build this class."""
    return FORGET_OBJECTIVES.register(name)


def register_retain_objective(name: str) -> Callable[[type], type]:
    """Class decorator: make ``get_retain_objective(name, **kwargs)`` build this class."""
    return RETAIN_OBJECTIVES.register(name)


def get_forget_objective(name: str, **kwargs: Any) -> Objective:
    """Build a forget objective (ga | npo | simnpo | rmu); bad names/options raise RetainFirstError."""
    return FORGET_OBJECTIVES.get(name, **kwargs)


def get_retain_objective(name: str, **kwargs: Any) -> Objective:
    """Build a retain objective (nll | kl | embed_diff | none); bad names/options raise RetainFirstError."""
    return RETAIN_OBJECTIVES.get(name, **kwargs)


def available_forget_objectives() -> list[str]:
    return FORGET_OBJECTIVES.available()


def available_retain_objectives() -> list[str]:
    return RETAIN_OBJECTIVES.available()
