"""One registry type for every extension point (the timm ``_registry`` idea).

A :class:`Registry` maps a name to a frozen, keyword-only spec (a preprocessing method, a
probe, a gene encoder, a projection head, an image preset, a loss) registered once with
:meth:`~Registry.add`. Registries drive construction (the spec says how to build), validation
at config load (``problem``, ``unknown_message``) and the test matrix (``names()``).

Registries that config validation reads are light (no torch): their specs point at the
implementation with a ``hescape.lazy.Ref`` (``"package.module:attr"``), imported on use.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a name to a spec ``T``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, entry: T, *, name: str | None = None) -> T:
        """Register ``entry`` under ``name`` (default ``entry.name``); a name is taken once."""
        key = name if name is not None else getattr(entry, "name", None)
        if not isinstance(key, str) or not key:
            raise ValueError(f"{self.kind}: entry {entry!r} has no name; pass name=")
        if key in self._entries:
            raise ValueError(f"{self.kind} {key!r} registered twice")
        self._entries[key] = entry
        return entry

    def remove(self, name: str) -> T:
        """Unregister ``name`` and return its entry (tests that register a temporary entry)."""
        if name not in self._entries:
            raise KeyError(self.unknown_message(name))
        return self._entries.pop(name)

    @contextmanager
    def temporarily(self, entry: T, *, name: str | None = None) -> Iterator[T]:
        """Register ``entry`` for the duration of a ``with`` block."""
        self.add(entry, name=name)
        key = name if name is not None else entry.name  # type: ignore[attr-defined]
        try:
            yield entry
        finally:
            self._entries.pop(key, None)

    def get(self, name: str) -> T:
        """The entry registered as ``name``; KeyError with close matches if unknown."""
        if name not in self._entries:
            raise KeyError(self.unknown_message(name))
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[T]:
        """Every entry, sorted by name."""
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def problem(self, name: str) -> str | None:
        """None when ``name`` is registered, else :meth:`unknown_message`."""
        return None if name in self._entries else self.unknown_message(name)

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names(), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}"
