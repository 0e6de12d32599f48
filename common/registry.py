"""Name -> builder registries with errors that list the valid choices."""
from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T", bound=Callable)


class UnknownNameError(KeyError):
    """A name that no registry entry has. ``str()`` gives the whole message."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """A dict of named builders; ``get`` fails with the close matches and every valid name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(fn: T) -> T:
            key = name or fn.__name__
            if key in self._entries:
                warnings.warn(f"{self.kind} {key!r} registered twice; the later one wins", stacklevel=2)
            self._entries[key] = fn
            return fn

        return deco

    def add(self, name: str, fn: T) -> None:
        self.register(name)(fn)

    def get(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        raise UnknownNameError(unknown_choice_message(self.kind, name, sorted(self._entries)))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def unknown_choice_message(kind: str, name: str, choices: list[str], hint: str = "") -> str:
    close = difflib.get_close_matches(str(name), choices, n=3, cutoff=0.5)
    msg = f"unknown {kind} {name!r}"
    if close:
        msg += f"; did you mean {', '.join(repr(c) for c in close)}?"
    msg += f" Valid {kind} names: {', '.join(choices)}."
    if hint:
        msg += " " + hint
    return msg
