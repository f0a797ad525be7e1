"""Name -> synthesizer class registry, so configs and the CLI can pick a strategy by a string."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from retainfirst.errors import RetainFirstError
from retainfirst.synthesis.base import Synthesizer

_REGISTRY: dict[str, type[Synthesizer]] = {}

SynthesizerClass = TypeVar("SynthesizerClass", bound=type[Synthesizer])


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_synthesizer(name: str) -> Callable[[SynthesizerClass], SynthesizerClass]:
    """Class decorator that makes a :class:`Synthesizer` subclass available under ``name``.

    The class gets ``cls.name = name``. Registering a taken name is an error, so a plugin cannot
    silently replace a built-in strategy.
    """
    key = _normalise(name)
    if not key:
        raise RetainFirstError("synthesizer name must be a non-empty string")

    def decorate(cls: SynthesizerClass) -> SynthesizerClass:
        if not (isinstance(cls, type) and issubclass(cls, Synthesizer)):
            raise RetainFirstError(f"register_synthesizer({name!r}) must decorate a Synthesizer subclass")
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise RetainFirstError(
                f"synthesizer name {key!r} is already registered by {_REGISTRY[key].__qualname__}; "
                "pick another name"
            )
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return decorate


def available_synthesizers() -> list[str]:
    """Registered strategy names, sorted."""
    return sorted(_REGISTRY)


def get_synthesizer(name: str, alpha: float = 1.0, gamma: float = 1.0, **options: Any) -> Synthesizer:
    """Build the strategy registered as ``name`` (alpha weights retain, gamma weights forget)."""
    if not isinstance(name, str):
        raise RetainFirstError(
            f"synthesizer name must be a string, got {type(name).__name__}; "
            f"valid choices: {', '.join(available_synthesizers())}"
        )
    key = _normalise(name)
    if key not in _REGISTRY:
        raise RetainFirstError(
            f"unknown synthesizer {name!r}; valid choices: {', '.join(available_synthesizers())}"
        )
    return _REGISTRY[key](alpha=alpha, gamma=gamma, **options)
