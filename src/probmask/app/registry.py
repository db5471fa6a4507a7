"""Things a config names: one small registry class for data sets, models and methods."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from probmask.app.errors import UserError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to objects (builders, loaders, classes), filled by the :meth:`register` decorator.

    ``what`` names the kind of thing and the config key in error messages, e.g.
    ``Registry("model.name")``. An unknown name is a :class:`UserError` that lists the choices.
    """

    def __init__(self, what: str, hint: str = "") -> None:
        self.what = what
        self.hint = hint  # appended to the unknown-name message
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` (a name is taken only once)."""

        def decorate(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} {name!r} is registered already")
            self._items[name] = obj
            return obj

        return decorate

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str) -> T:
        """The object registered as ``name``; a :class:`UserError` listing the choices if none is."""
        obj = self._items.get(name)
        if obj is None:
            close = difflib.get_close_matches(name, self.names(), n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"unknown {self.what} {name!r}: choose one of {', '.join(self.names())}{self.hint}{guess}")
        return obj
