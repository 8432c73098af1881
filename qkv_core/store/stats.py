"""What the store counts: events per tier (hit, miss, write, spill, evict, reload, corrupt,
orphan, reencode, error) and whether each optional tier is up. The services export them
(service_common.metrics); qkv_core knows no Prometheus."""
from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable


class StoreStats:
    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self.up: dict[str, bool] = {}  # optional tiers: disk, redis
        self.listeners: list[Callable[[str, bool], object]] = []  # told when a tier goes down or comes back

    def set_up(self, tier: str, ok: bool) -> None:
        changed = self.up.get(tier) != ok
        self.up[tier] = ok
        if changed:
            for listener in self.listeners:
                listener(tier, ok)

    def count(self, tier: str, event: str, n: int = 1) -> None:
        with self._lock:
            self._counts[tier, event] += n

    def get(self, tier: str, event: str) -> int:
        return self._counts[tier, event]

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)
