"""Name -> class registries (synthesizers, objectives, evaluation tasks), extensible by other packages.

Built-ins register with a decorator (``@SYNTHESIZERS.register("sago")``). A third-party package adds
entries without forking by declaring Python entry points in its own ``pyproject.toml``::

    [project.entry-points."retainfirst.synthesizers"]
    my_synth = "my_package.module:MySynthesizer"

Groups: ``retainfirst.synthesizers``, ``retainfirst.objectives`` (one group for both kinds: the class
says which with its ``kind = "forget"`` or ``"retain"`` class attribute) and ``retainfirst.tasks``.
Entry points are loaded lazily, on the first lookup, and again when a name is not found (so a
package installed while Python runs is seen). A plugin that fails to load does not break the
others: asking for it raises a one-line error naming the entry point, and it is listed as broken
in unknown-name errors.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from retainfirst.errors import RetainFirstError

T = TypeVar("T")


def normalise(name: str) -> str:
    """Registry key of a name: case, surrounding spaces and ``-`` vs ``_`` do not matter."""
    return name.strip().lower().replace("-", "_")


class Registry(Generic[T]):
    """Names -> classes (or factories) of one kind, with entry-point discovery in ``group``.

    ``what`` names an entry in messages ("synthesizer"); ``base`` is the class entries must
    subclass; ``kind`` keeps only entry points whose class declares that ``kind`` (for a group
    shared by several registries, such as forget and retain objectives; ``kinds`` are all the
    valid ones). Registered classes get ``cls.name`` (and ``cls.kind``) set.
    """

    def __init__(
        self,
        what: str,
        group: str | None = None,
        *,
        base: type | None = None,
        kind: str | None = None,
        kinds: tuple[str, ...] = (),
    ) -> None:
        self.what = what
        self.group = group
        self.base = base
        self.kind = kind
        self.kinds = kinds or ((kind,) if kind else ())
        self._entries: dict[str, T] = {}
        self._broken: dict[str, str] = {}  # entry-point name -> why it failed
        self._warned: set[str] = set()
        self._scanned = False

    # -- registration -----------------------------------------------------------------------
    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make the class available under ``name``; a taken name is an error."""

        def decorate(obj: T) -> T:
            self.add(name, obj)
            return obj

        self._key(name)  # fail at decoration time on a bad name
        return decorate

    def add(self, name: str, obj: T) -> None:
        key = self._key(name)
        if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise RetainFirstError(
                f"register {self.what} {name!r}: expected a {self.base.__name__} subclass, got {obj!r}"
            )
        old = self._entries.get(key)
        if old is not None and old is not obj:
            raise RetainFirstError(
                f"{self.what} name {key!r} is already registered by "
                f"{getattr(old, '__qualname__', old)!s}; pick another name"
            )
        if isinstance(obj, type):
            if self.kind:
                declared = getattr(obj, "kind", "")
                if declared and declared != self.kind:
                    raise RetainFirstError(
                        f"register {self.what} {name!r}: {obj.__qualname__}.kind is {declared!r}"
                    )
                obj.kind = self.kind  # type: ignore[attr-defined]
            obj.name = key  # type: ignore[attr-defined]
        self._entries[key] = obj

    def unregister(self, name: str) -> None:
        """Remove an entry (tests and plugins that replace themselves)."""
        self._entries.pop(self._key(name), None)

    def refresh(self) -> None:
        """Forget which entry points were seen, so the next lookup scans them again."""
        self._scanned = False
        self._broken.clear()

    # -- lookup -----------------------------------------------------------------------------
    def available(self) -> list[str]:
        """Registered names (built-ins and loaded plugins), sorted."""
        self._scan_once()
        return sorted(self._entries)

    def registered(self) -> list[str]:
        """Names in registration order (built-ins in import order, then plugins)."""
        self._scan_once()
        return list(self._entries)

    def failed_to_load(self, name: str) -> bool:
        """Whether ``name`` is a plugin whose entry point could not be loaded."""
        return normalise(name) in self._broken

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalise(name) in self.available()

    def lookup(self, name: str) -> T:
        """The class registered as ``name``; unknown names list the valid choices."""
        if not isinstance(name, str):
            raise RetainFirstError(
                f"{self.what} name must be a string, got {type(name).__name__}; "
                f"valid choices: {', '.join(self.available())}"
            )
        key = normalise(name)
        self._scan_once()
        if key not in self._entries and key not in self._broken:
            self._scan()  # a plugin installed since the last scan
        if key in self._entries:
            return self._entries[key]
        if key in self._broken:
            raise RetainFirstError(self._broken[key])
        broken = f" (plugins that failed to load: {', '.join(sorted(self._broken))})" if self._broken else ""
        raise RetainFirstError(
            f"unknown {self.what} {name!r}; valid choices: {', '.join(self.available())}{broken}"
        )

    def get(self, name: str, /, *args: Any, **options: Any) -> Any:
        """Build the entry registered as ``name`` with ``options``."""
        return self.lookup(name)(*args, **options)  # type: ignore[operator]

    # -- entry points -----------------------------------------------------------------------
    def _key(self, name: str) -> str:
        key = normalise(name) if isinstance(name, str) else ""
        if not key:
            raise RetainFirstError(f"{self.what} name must be a non-empty string, got {name!r}")
        return key

    def _scan_once(self) -> None:
        if not self._scanned:
            self._scan()

    def _scan(self) -> None:
        self._scanned = True
        if not self.group:
            return
        seen: set[str] = set()
        for point in importlib.metadata.entry_points(group=self.group):
            key = normalise(point.name)
            if key in seen:
                continue
            seen.add(key)
            where = f"{self.what} plugin {point.name!r} (entry point {point.value!r} in group {self.group})"
            try:
                obj = point.load()
                kind = getattr(obj, "kind", None)
                if self.kinds and kind not in self.kinds:
                    raise RetainFirstError(
                        f"its class must set kind to one of {', '.join(map(repr, self.kinds))}, got {kind!r}"
                    )
                if self.kind and kind != self.kind:
                    continue  # belongs to a registry of another kind sharing this group
                self.add(point.name, obj)
                self._broken.pop(key, None)
            except Exception as exc:  # any import-time failure of third-party code
                first = (str(exc).splitlines() or [""])[0]
                message = f"{where} failed to load: {type(exc).__name__}: {first}"
                self._broken[key] = message
                if message not in self._warned:  # once, not on every rescan
                    self._warned.add(message)
                    warnings.warn(message, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# Evaluation tasks: the classes live in retainfirst.evals.tasks, whose register_task / get_task /
# available_tasks add the task conventions (parametrised names such as lm_eval:<task>) on top.

TASKS: Registry[Any] = Registry("evaluation task", "retainfirst.tasks")
