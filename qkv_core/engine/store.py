"""The receiver's card store: dequantized caches kept in memory, least recently used evicted first.

Cards are keyed by (tenant, card id): a tenant sees, reuses and evicts-into only its own entries,
and a lookup of another tenant's card is the same dictionary miss as one of an absent card. A card
already held is never replaced (first writer wins); its id names its content (card.header), so a
second push of the same id is the same card.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from qkv_core.types import KVCache
from qkv_core.wire import pb

DEFAULT_TENANT = ""


@dataclass
class StoredCard:
    header: pb.CardHeader
    kv: KVCache

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.kv.keys, *self.kv.values))


class CardStore:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._cards: OrderedDict[tuple[str, str], StoredCard] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, card: StoredCard, tenant: str = DEFAULT_TENANT) -> list[str]:
        """Store a card unless the tenant holds its id already; returns the ids evicted to make
        room (never the new card itself)."""
        key = (tenant, card.header.card_id)
        evicted = []
        with self._lock:
            self._cards.setdefault(key, card)
            self._cards.move_to_end(key)
            while self.nbytes > self.budget_bytes and len(self._cards) > 1:
                evicted.append(self._cards.popitem(last=False)[0][1])
        return evicted

    def get(self, card_id: str, tenant: str = DEFAULT_TENANT) -> StoredCard | None:
        key = (tenant, card_id)
        with self._lock:
            card = self._cards.get(key)
            if card is not None:
                self._cards.move_to_end(key)
            return card

    def __len__(self) -> int:
        return len(self._cards)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._cards.values())
