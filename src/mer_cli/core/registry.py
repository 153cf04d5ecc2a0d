"""Registries: the one place where a kind of component (encoder, fusion, data format, metric,
modality) is looked up by the name a config or a run directory gives.

A name outside a registry is one error line listing the valid names; nothing a file names is ever
imported or called unless it is registered here by our own code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from mer_cli.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name, in registration order. ``kind`` names the config key users
    set (``model.encoder.name``), so an unknown name reads as the key it came from."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind}: {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of `add`: ``@ENCODERS.register("tcn")`` above a class."""

        def decorate(entry: T) -> T:
            return self.add(name, entry)

        return decorate

    def get(self, name: object, error: type[Exception] = ConfigError, where: str = "") -> T:
        """The entry called ``name``; else ``error`` with one line naming ``where`` it came from
        and the valid names."""
        if isinstance(name, str) and name in self._entries:
            return self._entries[name]
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}{self.kind}={name!r}: valid: {', '.join(self._entries)}")

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())
