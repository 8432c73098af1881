"""The receiver's card store: dequantized caches kept in memory, least recently used evicted first."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from qkv_core.types import KVCache
from qkv_core.wire import pb


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
        self._cards: OrderedDict[str, StoredCard] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, card: StoredCard) -> list[str]:
        """Store a card; returns the ids evicted to make room (never the new card itself)."""
        evicted = []
        with self._lock:
            self._cards[card.header.card_id] = card
            self._cards.move_to_end(card.header.card_id)
            while self.nbytes > self.budget_bytes and len(self._cards) > 1:
                evicted.append(self._cards.popitem(last=False)[0])
        return evicted

    def get(self, card_id: str) -> StoredCard | None:
        with self._lock:
            card = self._cards.get(card_id)
            if card is not None:
                self._cards.move_to_end(card_id)
            return card

    def __len__(self) -> int:
        return len(self._cards)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._cards.values())
