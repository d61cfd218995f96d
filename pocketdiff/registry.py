"""One small registry of named implementations, filled by a class decorator.

Recipe passes, exporters and runtime adapters each keep one: a backend or pass registers itself on
import, and callers look it up by name instead of branching over backends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes keyed by one of their class attributes (`key`), instantiated on lookup.

    `load` runs before every lookup so that built-in implementations have registered; an unknown
    name raises `error` with the message `unknown(name)` followed by the names available.
    """

    def __init__(self, key: str, error: type[Exception], unknown: Callable[[str], str],
                 load: Callable[[], None] | None = None) -> None:
        self._key = key
        self._error = error
        self._unknown = unknown
        self._load = load
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: make `cls` available under its `key` attribute."""
        name = getattr(cls, self._key)
        if name in self._classes:
            raise ValueError(f"{name!r} registered twice")
        self._classes[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Remove `name` (tests that register a temporary implementation)."""
        self._classes.pop(name, None)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        if self._load:
            self._load()
        return sorted(self._classes)

    def create(self, name: str) -> T:
        """A new instance of the class registered as `name`."""
        available = self.names()
        if name not in self._classes:
            raise self._error(f"{self._unknown(name)}; available: {', '.join(available) or 'none'}")
        return self._classes[name]()
