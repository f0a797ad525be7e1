"""Registries of forget and retain objectives, by name, with validated keyword options."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from retainfirst.errors import RetainFirstError
from retainfirst.objectives.base import Objective, build_objective

FORGET_OBJECTIVES: dict[str, type[Objective]] = {}
RETAIN_OBJECTIVES: dict[str, type[Objective]] = {}


def _register(registry: dict[str, type[Objective]], kind: str, name: str) -> Callable[[type], type]:
    def decorator(cls: type[Objective]) -> type[Objective]:
        if name in registry and registry[name] is not cls:
            taken = registry[name].__name__
            raise RetainFirstError(f"{kind} objective {name!r} is already registered ({taken})")
        cls.name = name
        cls.kind = kind
        registry[name] = cls
        return cls

    return decorator


def register_forget_objective(name: str) -> Callable[[type], type]:
    """Class decorator: make ``get_forget_objective(name, **kwargs)`` build this class."""
    return _register(FORGET_OBJECTIVES, "forget", name)


def register_retain_objective(name: str) -> Callable[[type], type]:
    """Class decorator: make ``get_retain_objective(name, **kwargs)`` build this class."""
    return _register(RETAIN_OBJECTIVES, "retain", name)


def get_forget_objective(name: str, **kwargs: Any) -> Objective:
    """Build a forget objective (ga | npo | simnpo | rmu); bad names/options raise RetainFirstError."""
    return build_objective(FORGET_OBJECTIVES, "forget", name, kwargs)


def get_retain_objective(name: str, **kwargs: Any) -> Objective:
    """Build a retain objective (nll | kl | embed_diff); bad names/options raise RetainFirstError."""
    return build_objective(RETAIN_OBJECTIVES, "retain", name, kwargs)


def available_forget_objectives() -> list[str]:
    return sorted(FORGET_OBJECTIVES)


def available_retain_objectives() -> list[str]:
    return sorted(RETAIN_OBJECTIVES)
