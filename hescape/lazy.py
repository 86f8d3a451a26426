"""Lazy imports: references resolved on first use, and package exports loaded on access.

- :class:`Ref` (``"package.module:attr"``) lets a light registry name an implementation
  that imports torch without importing it (config validation reads the registry only).
- :func:`lazy_exports` gives a package PEP 562 exports: ``import hescape.train`` stays
  cheap, ``hescape.train.fit`` imports ``hescape.train.runner`` on first access.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Ref:
    """A lazy reference ``"package.module:attr"``, imported by :meth:`load`."""

    target: str

    def __post_init__(self) -> None:
        module, sep, attr = self.target.partition(":")
        if not (module and sep and attr):
            raise ValueError(f"reference {self.target!r}: expected 'package.module:attr'")

    def load(self) -> Any:
        """The referenced object (its module is imported now)."""
        module, _, attr = self.target.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[list[str], Callable[[str], Any]]:
    """``(__all__, __getattr__)`` for ``package`` whose name ``n`` lives in the submodule
    ``exports[n]``: ``__all__, __getattr__ = lazy_exports(__name__, {...})``."""
    table = dict(exports)

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{table[name]}"), name)

    return sorted(table), __getattr__
