"""The receiver's card store: the tiers put together.

    hot     decoded caches of recently used cards (hot_bytes), least recently used dropped first
    memory  cards as they came over the wire, compact (store_bytes): above the high-water mark
            cold cards leave down to the low-water mark: spilled (dropped from memory, the disk
            tier holds them), or, with no disk tier or a full one, re-encoded a step smaller
            (qkv_core.card.reencode) before any is dropped
    disk    card files, written through on accept and read after a restart (store_dir)
    redis   the shared tier, written through on accept, read by any receiver (store_redis)

A lookup goes down the tiers and brings what it finds up: every card it decodes goes through the
engine's validating reader (`decode`), so a corrupt or truncated file or value is detected,
dropped from its tier and counted, never served. A delta card is kept as it arrived (its own
tokens only) and decoded onto its parent, which the reader looks up here in turn: a delta outlives
its decoded form only as long as its parent is held (one whose parent is gone is dropped).
Whole-layer cards are indexed by their block hashes (qkv_core.store.prefixes) for FindPrefix.
Keys are (tenant, card id): a tenant never sees another's cards, and a card already held is never
replaced (first writer wins). A card id is checked (64 lowercase hex digits) before any tier is
touched, so no request string ever becomes a file name or a Redis key. A text handoff has no
encoded form: it lives in the hot tier only.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import cast

from qkv_core.card.framing import frames
from qkv_core.card.header import CARD_ID
from qkv_core.card.reencode import reencode
from qkv_core.config import StoreConfig
from qkv_core.errors import CardError, ErrorKind, RequestError
from qkv_core.store.cardfile import Sealer
from qkv_core.store.disk import DiskTier
from qkv_core.store.lru import ByteLRU
from qkv_core.store.prefixes import MAX_CHAIN, PrefixIndex
from qkv_core.store.records import DEFAULT_TENANT, CardRecord, Key, StoredCard
from qkv_core.store.shared import RedisTier
from qkv_core.store.stats import StoreStats
from qkv_core.types import KVCache
from qkv_core.wire import pb

log = logging.getLogger(__name__)
Decode = Callable[[Iterable[pb.CardFrame], str], tuple[CardRecord, KVCache]]  # frames, tenant
ENTRY_MARGIN = 16 << 20  # a stored card's header and framing beside its payload: far above what the limits allow


def checked_id(card_id: str) -> str:
    """`card_id` if it is a card id (64 lowercase hex digits); INVALID_ARGUMENT otherwise."""
    if not CARD_ID.fullmatch(card_id):
        raise RequestError("a card id is 64 lowercase hex digits (a SHA-256)")
    return card_id


class CardStore:
    def __init__(self, cfg: StoreConfig, model: str, decode: Decode, max_card_bytes: int = 1 << 30):
        """`model`: the namespace of the disk and Redis entries (the weights hash); `decode`: the
        engine's validating reader, frames (and their tenant) in, the card as received and its decoded
        cache out; `max_card_bytes`: the largest card the receiver takes (bounds what a tier may claim)."""
        self.cfg = cfg
        self.namespace = model
        self.decode = decode
        self.stats = StoreStats()
        self.prefixes = PrefixIndex(cfg.prefix_blocks)
        self.hot: ByteLRU[Key, StoredCard] = ByteLRU(lambda c: c.nbytes)
        self.memory: ByteLRU[Key, CardRecord] = ByteLRU(lambda r: r.nbytes)
        sealer = Sealer.from_file(cfg.store_key) if cfg.store_key else None
        if cfg.store_redis and sealer is None:
            log.warning("the shared tier %s is not sealed (no store_key): whoever can write to it can fill it, and "
                        "its key names show tenants and card ids", cfg.store_redis.split("@")[-1])
        self.disk = DiskTier(Path(cfg.store_dir), model, cfg.store_disk_bytes, sealer,
                             self.stats) if cfg.store_dir else None
        self.shared = (RedisTier(cfg.store_redis, model, cfg.store_redis_ttl_s, sealer, self.stats,
                                 max_card_bytes + ENTRY_MARGIN) if cfg.store_redis else None)

    def put(self, card: StoredCard, record: CardRecord | None, tenant: str = DEFAULT_TENANT) -> bool:
        """Keep an accepted card (`record` None: a text handoff). False if the tenant holds it already."""
        key = (tenant, card.header.card_id)
        if key in self.hot or key in self.memory:
            return False
        self._keep_hot(key, card)
        if card.header.block_hashes and not card.header.layer_sources and not card.kv.is_ragged:
            self.prefixes.add(tenant, card.header, self.depth(card.header, tenant))
        if record is not None:
            self.memory.add(key, record)
            if self.disk is not None:
                self.disk.write(key, record)
            if self.shared is not None:
                self.shared.write(key, record)
            self._relieve()
        return True

    def get(self, card_id: str, tenant: str = DEFAULT_TENANT) -> StoredCard | None:
        """The decoded card, from whichever tier holds it (brought up to the faster ones)."""
        key = (tenant, checked_id(card_id))
        if (card := self.hot.get(key)) is not None:
            self.stats.count("hot", "hit")
            return card
        self.stats.count("hot", "miss")
        if (record := self.memory.get(key)) is not None:
            found: tuple[str, Iterable[pb.CardFrame]] | None = ("memory", frames(record.header, record.blobs))
        else:
            self.stats.count("memory", "miss")
            found = self._fetch(key)
        if found is None:
            return None
        tier, stream = found
        try:
            record, kv = self.decode(stream, tenant)
        except CardError as e:
            if e.kind == ErrorKind.PARENT_MISSING:  # a delta whose parent is gone can never be read again
                self._orphaned(tier, key, e)
                return None
            if tier == "memory" or e.kind not in (ErrorKind.DATA_LOSS, ErrorKind.INVALID):
                raise
            self._corrupt(tier, key, e)
            return None
        self.stats.count(tier, "hit")
        card = StoredCard(record.header, kv)
        if tier != "memory":
            self.stats.count(tier, "reload")
            self.memory.add(key, record)
            if tier == "redis" and self.disk is not None:
                self.disk.write(key, record)
            self._relieve()
        self._keep_hot(key, card)
        return card

    def has(self, card_id: str, tenant: str = DEFAULT_TENANT) -> pb.CardHeader | None:
        """The header of a card the tenant holds in any tier (brought up, as `get` does)."""
        key = (tenant, checked_id(card_id))
        held = self.hot.get(key) or self.memory.get(key)
        if held is not None:
            return held.header
        card = self.get(card_id, tenant)
        return None if card is None else card.header

    def _fetch(self, key: Key) -> tuple[str, Iterable[pb.CardFrame]] | None:
        for tier, source in (("disk", self.disk), ("redis", self.shared)):
            if source is None:
                continue
            try:
                stream = source.read(key)
            except CardError as e:  # the tier's own checks (Redis: the entry's length and digest)
                self._corrupt(tier, key, e)
                continue
            if stream is not None:
                return tier, stream
            self.stats.count(tier, "miss")
        return None

    def find_prefix(self, hashes: list[bytes], tenant: str = DEFAULT_TENANT, codecs: Collection[str] = (),
                    ) -> tuple[str, int] | None:
        """(card id, common tokens) of the held card (of `codecs`, if named) sharing the longest prefix
        with a context."""
        return self.prefixes.longest(tenant, hashes, lambda card_id: self.has(card_id, tenant) is not None, codecs)

    def depth(self, header: pb.CardHeader, tenant: str = DEFAULT_TENANT) -> int:
        """The deltas from this card down to a whole card (0: a whole card), counted to MAX_CHAIN + 1."""
        depth, held = 0, cast(pb.CardHeader | None, header)
        while held is not None and held.parent_card_id and depth <= MAX_CHAIN:
            depth += 1
            held = self.has(held.parent_card_id, tenant)
        return depth

    def _orphaned(self, tier: str, key: Key, error: CardError) -> None:
        self.stats.count(tier, "orphan")
        log.info("%s tier: delta card %s dropped: %s", tier, key[1][:12], error)
        self.memory.pop(key)
        for source in (self.disk, self.shared):
            if source is not None:
                source.drop(key)

    def _corrupt(self, tier: str, key: Key, error: CardError) -> None:
        """An entry that fails its checks is dropped from its tier and counted, never served."""
        self.stats.count(tier, "corrupt")
        log.warning("%s tier: card %s is corrupt (%s); dropped", tier, key[1][:12], error)
        (self.disk if tier == "disk" else self.shared).drop(key)  # type: ignore[union-attr]

    def _keep_hot(self, key: Key, card: StoredCard) -> None:
        self.hot.add(key, card)
        self.stats.count("hot", "evict", len(self.hot.shrink_to(self.cfg.hot_bytes, keep=key)))

    def _relieve(self) -> None:
        """Above the high-water mark: spill, then re-encode, then drop cold cards down to the low-water mark."""
        budget = self.cfg.store_bytes
        if self.memory.nbytes <= budget * self.cfg.store_high_water:
            return
        low = budget * self.cfg.store_low_water
        for key in self.memory.coldest():
            if self.memory.nbytes <= low:
                return
            if self.disk is not None and key in self.disk:
                self.memory.pop(key)
                self.stats.count("memory", "spill")
            elif self.disk is None or self.disk.full:
                record = self.memory.peek(key)
                smaller = reencode(record.header, record.blobs) if record is not None else None
                if smaller is not None:
                    self.memory.replace(key, CardRecord(*smaller))
                    self.stats.count("memory", "reencode")
        self.stats.count("memory", "evict", len(self.memory.shrink_to(int(low))))

    def tenant_bytes(self, tenant: str) -> int:
        """Bytes the tenant's cards take in RAM (memory tier and hot tier): what its Info reports."""
        with self.memory.lock, self.hot.lock:
            return (sum(self.memory.size_of(key) for key in self.memory.coldest() if key[0] == tenant)
                    + sum(self.hot.size_of(key) for key in self.hot.coldest() if key[0] == tenant))

    @property
    def nbytes(self) -> int:
        """Bytes held in RAM: the memory tier and the hot tier."""
        return self.memory.nbytes + self.hot.nbytes

    def __len__(self) -> int:
        """Cards held in RAM (a card in both tiers counts once)."""
        with self.memory.lock:
            return len(self.memory) + sum(1 for key in self.hot.coldest() if key not in self.memory)
