"""A byte-counted LRU map (thread-safe): the memory and hot tiers."""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteLRU(Generic[K, V]):
    """Entries with their sizes; the least recently used is `coldest`. A key already held is never
    replaced (`add` returns False): the first writer wins."""

    def __init__(self, size: Callable[[V], int]):
        self._size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self.nbytes = 0
        self.lock = threading.RLock()

    def add(self, key: K, value: V) -> bool:
        with self.lock:
            if key in self._items:
                self._items.move_to_end(key)
                return False
            self._items[key] = value
            self.nbytes += self._size(value)
            return True

    def replace(self, key: K, value: V) -> None:
        """Swap an entry's value in place (its recency unchanged): a re-encoded card."""
        with self.lock:
            self.nbytes += self._size(value) - self._size(self._items[key])
            self._items[key] = value

    def get(self, key: K) -> V | None:
        with self.lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def peek(self, key: K) -> V | None:
        """An entry without making it recent."""
        with self.lock:
            return self._items.get(key)

    def size_of(self, key: K) -> int:
        """An entry's counted size (0 when absent)."""
        with self.lock:
            value = self._items.get(key)
            return 0 if value is None else self._size(value)

    def pop(self, key: K) -> V | None:
        with self.lock:
            value = self._items.pop(key, None)
            if value is not None:
                self.nbytes -= self._size(value)
            return value

    def coldest(self) -> list[K]:
        """Ks from the least recently used on."""
        with self.lock:
            return list(self._items)

    def shrink_to(self, budget: int, keep: K | None = None) -> list[K]:
        """Drop the least recently used until at most `budget` bytes are held (never `keep`, which
        becomes the most recent if it was the oldest). Touches only what it drops: no copy of the keys."""
        dropped = []
        with self.lock:
            while self.nbytes > budget and len(self._items) > (keep in self._items):
                key = next(iter(self._items))
                if key == keep:
                    self._items.move_to_end(key)
                    continue
                self.pop(key)
                dropped.append(key)
        return dropped

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
