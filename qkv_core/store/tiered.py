"""The receiver's card store: the tiers put together.

    hot     decoded caches of recently used cards (hot_bytes), least recently used dropped first
    memory  cards as they came over the wire, compact (store_bytes): above the high-water mark
            cold cards leave down to the low-water mark: spilled (dropped from memory, the disk
            tier holds them), or, with no disk tier or a full one, re-encoded a step smaller
            (qkv_core.card.reencode) before any is dropped
    disk    card files, written through on accept and read after a restart (store_dir)
    redis   the shared tier, written through on accept, read by any receiver (store_redis)

The tiers below RAM are an ordered list of qkv_core.store.tier.Tier, made by the factories in
TIER_FACTORIES (disk, then redis, then any a deployment registers with register_tier), each of
which returns None when its tier is not configured. A card accepted is written through every
tier; one found in a slower tier is written up into the faster ones.

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
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from qkv_core.card.framing import frames
from qkv_core.card.naming import CARD_ID
from qkv_core.card.reencode import reencode
from qkv_core.config import StoreConfig
from qkv_core.errors import CardError, ErrorKind, RequestError
from qkv_core.store.cardfile import Sealer
from qkv_core.store.disk import DiskTier
from qkv_core.store.lru import ByteLRU
from qkv_core.store.prefixes import MAX_CHAIN, PrefixIndex
from qkv_core.store.records import DEFAULT_TENANT, CardRecord, Key, StoredCard
from qkv_core.store.redis import RedisTier
from qkv_core.store.stats import StoreStats
from qkv_core.store.tier import Tier
from qkv_core.types import KVCache
from qkv_core.wire import pb

log = logging.getLogger(__name__)
Decode = Callable[[Iterable[pb.CardFrame], str], tuple[CardRecord, KVCache]]  # frames, tenant
ENTRY_MARGIN = 16 << 20  # a stored card's header and framing beside its payload: far above what the limits allow


@dataclass(frozen=True)
class TierSetting:
    """What a tier factory is given: the store's configuration, the model's namespace (the weights
    hash), the key that seals entries (None: plain), the counters, and the largest entry a tier may
    hand back (a card at the receiver's limit with its header)."""

    cfg: StoreConfig
    namespace: str
    sealer: Sealer | None
    stats: StoreStats
    max_entry_bytes: int


TierFactory = Callable[[TierSetting], Tier | None]


def _disk(s: TierSetting) -> Tier | None:
    if not s.cfg.store_dir:
        return None
    return DiskTier(Path(s.cfg.store_dir), s.namespace, s.cfg.store_disk_bytes, s.sealer, s.stats)


def _redis(s: TierSetting) -> Tier | None:
    if not s.cfg.store_redis:
        return None
    if s.sealer is None:
        log.warning("the shared tier %s is not sealed (no store_key): whoever can write to it can fill it, and "
                    "its key names show tenants and card ids", s.cfg.store_redis.split("@")[-1])
    return RedisTier(s.cfg.store_redis, s.namespace, s.cfg.store_redis_ttl_s, s.sealer, s.stats, s.max_entry_bytes)


TIER_FACTORIES: dict[str, TierFactory] = {"disk": _disk, "redis": _redis}  # fastest first


def register_tier(name: str, factory: TierFactory) -> None:
    """Add a tier below those registered (slowest last); stores made from now on have it when the
    factory returns one. `name` is the tier's own (Tier.name)."""
    if name in TIER_FACTORIES or name in ("hot", "memory"):
        raise ValueError(f"a store tier named {name!r} exists already")
    TIER_FACTORIES[name] = factory


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
        setting = TierSetting(cfg, model, sealer, self.stats, max_card_bytes + ENTRY_MARGIN)
        self.tiers: list[Tier] = [t for make in TIER_FACTORIES.values() if (t := make(setting)) is not None]

    def tier(self, name: str) -> Tier | None:
        return next((t for t in self.tiers if t.name == name), None)

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

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
            for tier in self.tiers:
                tier.put(key, record)
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
            found: tuple[int, Iterable[pb.CardFrame]] | None = (-1, frames(record.header, record.blobs))
        else:
            self.stats.count("memory", "miss")
            found = self._fetch(key)
        if found is None:
            return None
        at, stream = found  # at: the index of the tier it came from; -1 the memory tier
        name = self.tiers[at].name if at >= 0 else "memory"
        try:
            record, kv = self.decode(stream, tenant)
        except CardError as e:
            if e.kind == ErrorKind.PARENT_MISSING:  # a delta whose parent is gone can never be read again
                self._orphaned(name, key, e)
                return None
            if at < 0 or e.kind not in (ErrorKind.DATA_LOSS, ErrorKind.INVALID):
                raise
            self._corrupt(self.tiers[at], key, e)
            return None
        self.stats.count(name, "hit")
        card = StoredCard(record.header, kv)
        if at >= 0:
            self.stats.count(name, "reload")
            self.memory.add(key, record)
            for faster in self.tiers[:at]:
                faster.put(key, record)
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

    def _fetch(self, key: Key) -> tuple[int, Iterable[pb.CardFrame]] | None:
        for at, tier in enumerate(self.tiers):
            try:
                stream = tier.get(key)
            except CardError as e:  # the tier's own checks (Redis: the entry's length and digest)
                self._corrupt(tier, key, e)
                continue
            if stream is not None:
                return at, stream
            self.stats.count(tier.name, "miss")
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

    def _orphaned(self, name: str, key: Key, error: CardError) -> None:
        self.stats.count(name, "orphan")
        log.info("%s tier: delta card %s dropped: %s", name, key[1][:12], error)
        self.memory.pop(key)
        for tier in self.tiers:
            tier.remove(key)

    def _corrupt(self, tier: Tier, key: Key, error: CardError) -> None:
        """An entry that fails its checks is dropped from its tier and counted, never served."""
        self.stats.count(tier.name, "corrupt")
        log.warning("%s tier: card %s is corrupt (%s); dropped", tier.name, key[1][:12], error)
        tier.remove(key)

    def _keep_hot(self, key: Key, card: StoredCard) -> None:
        self.hot.add(key, card)
        self.stats.count("hot", "evict", len(self.hot.shrink_to(self.cfg.hot_bytes, keep=key)))

    def _relieve(self) -> None:
        """Above the high-water mark: spill, then re-encode, then drop cold cards down to the low-water mark."""
        budget = self.cfg.store_bytes
        if self.memory.nbytes <= budget * self.cfg.store_high_water:
            return
        low = budget * self.cfg.store_low_water
        keeping = [t for t in self.tiers if t.keeps_spills]
        for key in self.memory.coldest():
            if self.memory.nbytes <= low:
                return
            if any(key in t for t in keeping):
                self.memory.pop(key)
                self.stats.count("memory", "spill")
            elif all(t.full for t in keeping):  # none to spill to (all() of none is true)
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
