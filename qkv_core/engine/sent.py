"""What the sender last handed on for a request, per tenant: the card a context became under given
settings. The same request again is then answered by one HasCard, with no prefill and no encoding;
that matters for delta cards, whose id depends on the parent they extended, so the sender could not
find it again by encoding the context."""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class Sent:
    card_id: str
    context_tokens: int
    parent_card_id: str = ""  # a delta card: the card it extends
    parent_tokens: int = 0


class SentCards:
    """(tenant, context digest, settings) -> Sent, the least recently added dropped past `max_entries`."""

    def __init__(self, max_entries: int = 4096):
        self.max_entries = max_entries
        self._sent: OrderedDict[tuple, Sent] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(tenant: str, context: str, settings: Hashable) -> tuple:
        return tenant, hashlib.sha256(context.encode()).digest(), settings

    def get(self, key: tuple) -> Sent | None:
        with self._lock:
            return self._sent.get(key)

    def add(self, key: tuple, sent: Sent) -> None:
        with self._lock:
            self._sent[key] = sent
            self._sent.move_to_end(key)
            while len(self._sent) > self.max_entries:
                self._sent.popitem(last=False)

    def forget(self, key: tuple) -> None:
        with self._lock:
            self._sent.pop(key, None)
