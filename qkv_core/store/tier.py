"""The interface of a store tier below RAM: what qkv_core.store.tiered.CardStore asks of the disk
tier, the Redis tier, or one a deployment adds (register it with tiered.register_tier).

A tier keeps card records (a card as it came over the wire, qkv_core.store.records.CardRecord) by
key (tenant, card id). Only CardStore calls it, from request threads, concurrently: a tier locks
what it must. The calls, and when CardStore makes them:

    put(key, record)    a card was accepted (write-through, every tier in order), or was found in
                        a slower tier (written up into the faster ones); False when it could not be
                        kept (no room, unreachable): the card stays in the tiers that hold it
    get(key)            a lookup missed RAM and the tiers before this one: the card's frames, to be
                        read through the engine's validating reader, or None when not held.
                        CardError for an entry that fails the tier's own checks: CardStore then
                        drops it (remove) and counts it corrupt; it is never served
    remove(key)         the entry is corrupt, or a delta whose parent is gone; no error if absent
    key in tier         held, as far as the tier knows without reading it (may be stale)
    close()             the receiver stops

Attributes CardStore reads: `name` (the metric label, the health service qkvcomm.store.NAME and
the StoreStats key), `keeps_spills` (a card this tier holds may leave RAM under memory pressure:
true for the disk, not for Redis, whose entries expire), `full` (no room for more: the store
re-encodes cold cards smaller instead of spilling them) and `held()` (bytes and cards, for the
metrics, where the tier knows them cheaply). A tier reports its health through
StoreStats.set_up(name, ok) and its events through StoreStats.count(name, event).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from qkv_core.store.records import CardRecord, Key
from qkv_core.wire import pb


class Tier(ABC):
    name: str
    keeps_spills: bool = False

    @abstractmethod
    def put(self, key: Key, record: CardRecord) -> bool: ...

    @abstractmethod
    def get(self, key: Key) -> Iterator[pb.CardFrame] | None: ...

    @abstractmethod
    def remove(self, key: Key) -> None: ...

    @abstractmethod
    def __contains__(self, key: Key) -> bool: ...

    @property
    def full(self) -> bool:
        return False

    def held(self) -> tuple[int, int] | None:
        """(bytes, cards) this tier holds; None where it cannot tell cheaply (a shared server)."""
        return None

    def close(self) -> None:  # noqa: B027 - a tier without resources has nothing to release
        return None
