"""The one bounded memo type behind every per-header, per-layout and per-output cache."""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Memo(dict[K, V], Generic[K, V]):
    """A dict that holds at most ``capacity`` entries, forgetting the oldest first.

    A stream repeats a few headers and layouts, so their derived values are remembered; a
    sender or receiver that makes new ones per message (ids in shapes, hostile input) must
    not make the cache grow. Lookups are plain ``dict`` lookups (``memo.get(key)``), which
    the fast paths rely on: they cost the same as an ordinary dict's. Only ``remember``
    inserts.
    """

    __slots__ = ("capacity",)

    def __init__(self, capacity: int) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"a memo holds at least one entry, got capacity {capacity}")
        self.capacity = capacity

    def remember(self, key: K, value: V) -> V:
        """Store ``value`` under ``key`` (evicting the oldest entry when full); return it."""
        if key not in self and len(self) >= self.capacity:
            del self[next(iter(self))]
        self[key] = value
        return value
