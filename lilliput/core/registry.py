"""A registry maps a key (a name or a config type) to the thing that handles it.

Built-in parts register themselves exactly as a third-party plugin would, so extending lilliput
never means editing an `if` chain.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Hashable, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of handlers. `@REG.register("name")` adds one; `REG["name"]` looks it up."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[Hashable, T] = {}

    def register(self, key: Hashable) -> Callable[[T], T]:
        def add(item: T) -> T:
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = item
            return item

        return add

    def __getitem__(self, key: Hashable) -> T:
        try:
            return self._items[key]
        except KeyError:
            known = ", ".join(sorted(map(str, self._items))) or "none"
            raise ValueError(f"unknown {self.kind} {key!r}; known: {known}") from None

    def __contains__(self, key: Any) -> bool:
        return key in self._items

    def keys(self) -> list[Hashable]:
        return list(self._items)
