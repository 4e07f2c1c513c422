"""Named implementations of one kind, each registered where it is defined.

Attacks, model attacks, DP engines, corpora and audit canary designs are each a table
from a name (what a study config writes) to a function or class. One small class keeps
the rule the same for all of them: a name is registered once, and asking for an unknown
name is a one-line error that lists the known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from privtune.errors import PrivtuneError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """A read-only mapping of ``kind`` names to implementations, filled by :meth:`register`.

    ``alternative``: what the error adds to the list of names (``or a path to a file``).
    """

    def __init__(self, kind: str, *, alternative: str = "", sort: bool = False):
        self.kind = kind
        self.alternative = alternative
        self.sort = sort
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: add the decorated function or class as ``name`` (once)."""
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item
        return add

    def lookup(self, name: str) -> T:
        """The implementation called ``name``; an unknown name is a :class:`PrivtuneError`."""
        if name not in self._items:
            names = sorted(self._items) if self.sort else list(self._items)
            also = f", {self.alternative}" if self.alternative else ""
            raise PrivtuneError(f"unknown {self.kind} {name!r}", f"use one of: {', '.join(names)}{also}")
        return self._items[name]

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
