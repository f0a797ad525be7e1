"""Name -> synthesizer class registry (plus ``retainfirst.synthesizers`` entry points from other packages)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from retainfirst.registry import Registry
from retainfirst.synthesis.base import Synthesizer

SYNTHESIZERS: Registry[type[Synthesizer]] = Registry(
    "synthesizer", "retainfirst.synthesizers", base=Synthesizer
)

SynthesizerClass = TypeVar("SynthesizerClass", bound=type[Synthesizer])


def register_synthesizer(name: str) -> Callable[[SynthesizerClass], SynthesizerClass]:
    """Class decorator that makes a :class:`Synthesizer` subclass available under ``name``.

    The class gets ``cls.name = name``. Registering a taken name is an error, so a plugin cannot
    silently replace a built-in strategy.
    """
    return SYNTHESIZERS.register(name)  # type: ignore[return-value]


def available_synthesizers() -> list[str]:
    """Registered strategy names, sorted."""
    return SYNTHESIZERS.available()


def get_synthesizer(name: str, alpha: float = 1.0, gamma: float = 1.0, **options: Any) -> Synthesizer:
    """Build the strategy registered as ``name`` (alpha weights retain, gamma weights forget)."""
    return SYNTHESIZERS.get(name, alpha=alpha, gamma=gamma, **options)
