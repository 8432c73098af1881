"""The shared tier: cards in Redis (or Valkey), so that any receiver of a model can serve a card
another receiver accepted.

An entry is a card file's bytes (qkv_core.store.cardfile, sealed when the store has a key) in
chunks of at most 1 MiB under KEY:0 .. KEY:N-1, then KEY itself holding "N LENGTH SHA256",
written last, so that a reader never takes a partial entry for a card. Every key carries the TTL.

    KEY = qkvcomm:card:MODEL:TENANT:CARD_ID     no store key (MODEL: 16 hex digits of the weights
                                                 hash; TENANT: its name in hex, "-" for the default)
    KEY = qkvcomm:card:MODEL:sealed:NAME        with a store key: NAME is the keyed hash of tenant
                                                 and card id (cardfile.Sealer.name)

Reads bound the index by the receiver's card limit before fetching anything, then check the
length and the SHA-256 before the card's own checks (which include that the entry holds the card
asked for). An entry that fails any check is one bad entry: dropped and counted, the tier stays up.
Redis being down never fails a call: the failing call is counted and logged, the tier is marked
down and skipped for RETRY_S seconds, then tried again; meanwhile the receiver serves from its
local tiers.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Iterator
from typing import cast

import redis

from qkv_core.errors import CardError, ErrorKind
from qkv_core.store.cardfile import Sealer, from_bytes, to_bytes
from qkv_core.store.records import CardRecord, Key
from qkv_core.store.stats import StoreStats
from qkv_core.store.tier import Tier
from qkv_core.wire import pb

log = logging.getLogger(__name__)
CHUNK_BYTES = 1 << 20
RETRY_S = 5.0
TIMEOUT_S = 1.0


class RedisTier(Tier):
    name = "redis"

    def __init__(self, url: str, model: str, ttl_s: int, sealer: Sealer | None, stats: StoreStats,
                 max_entry_bytes: int):
        """`max_entry_bytes`: the largest entry read back (a card at the receiver's limit with its
        header); an index that claims more is refused before any chunk is fetched."""
        self.client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        self.url = url.split("@")[-1]  # what is logged: never a password in the URL
        self.model, self.ttl_s, self.sealer, self.stats = model, ttl_s, sealer, stats
        self.max_entry_bytes = max_entry_bytes
        self._down_until = 0.0
        self._lock = threading.Lock()
        stats.set_up("redis", True)

    def key(self, key: Key) -> str:
        tenant, card_id = key
        if self.sealer is not None:
            return f"qkvcomm:card:{self.model}:sealed:{self.sealer.name(self.model, key)}"
        return f"qkvcomm:card:{self.model}:{tenant.encode().hex() or '-'}:{card_id}"

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, error: Exception) -> None:
        with self._lock:
            was_up = self.stats.up["redis"]
            self._down_until = time.monotonic() + RETRY_S
        self.stats.set_up("redis", False)
        self.stats.count("redis", "error")
        if was_up:
            log.warning("shared tier %s is unavailable (%s: %s); serving from the local tiers, retrying every %gs",
                        self.url, what, error, RETRY_S)

    def _recovered(self) -> None:
        if not self.stats.up["redis"]:
            self.stats.set_up("redis", True)
            log.info("shared tier %s is back", self.url)

    def put(self, key: Key, record: CardRecord) -> bool:
        if not self._available():
            return False
        data = to_bytes(record, self.model, key, self.sealer)
        name = self.key(key)
        chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for i, chunk in enumerate(chunks):
                    pipe.set(f"{name}:{i}", chunk, ex=self.ttl_s)
                pipe.set(name, f"{len(chunks)} {len(data)} {hashlib.sha256(data).hexdigest()}", ex=self.ttl_s)
                pipe.execute()
        except redis.RedisError as e:
            self._failed("write", e)
            return False
        self._recovered()
        self.stats.count("redis", "write")
        return True

    def __contains__(self, key: Key) -> bool:
        if not self._available():
            return False
        try:
            found = bool(self.client.exists(self.key(key)))
        except redis.RedisError as e:
            self._failed("exists", e)
            return False
        self._recovered()
        return found

    def get(self, key: Key) -> Iterator[pb.CardFrame] | None:
        """The card's frames, or None when Redis has no such card (or is down); DATA_LOSS when the
        entry is incomplete or its digest does not match."""
        if not self._available():
            return None
        name = self.key(key)
        try:
            meta = cast(bytes | None, self.client.get(name))  # the client returns bytes (no decode_responses)
            if meta is None:
                return None
            count, length, digest = self._index(meta)
            chunks = cast(list[bytes | None], self.client.mget([f"{name}:{i}" for i in range(count)]) if count else [])
        except redis.RedisError as e:
            self._failed("read", e)
            return None
        self._recovered()
        present = [c for c in chunks if c is not None]
        if len(present) != len(chunks):
            raise CardError(ErrorKind.DATA_LOSS, "shared entry lost chunks (expired or evicted)")
        if sum(map(len, present)) != length:
            raise CardError(ErrorKind.DATA_LOSS, "shared entry fails its length check")
        data = b"".join(present)
        if hashlib.sha256(data).hexdigest() != digest:
            raise CardError(ErrorKind.DATA_LOSS, "shared entry fails its SHA-256 check")
        return from_bytes(data, self.model, key, self.sealer)

    def _index(self, meta: bytes) -> tuple[int, int, str]:
        """(chunks, bytes, SHA-256) of an entry's index "N LENGTH SHA256"; DATA_LOSS unless it is well formed
        and within max_entry_bytes, with N the chunks LENGTH takes."""
        try:
            count, length, digest = meta.decode().split()
            count_n, length_n = int(count), int(length)
        except (UnicodeDecodeError, ValueError):
            raise CardError(ErrorKind.DATA_LOSS, "shared entry has a malformed index") from None
        if (not 0 < length_n <= self.max_entry_bytes or count_n != math.ceil(length_n / CHUNK_BYTES)
                or len(digest) != 64):
            raise CardError(ErrorKind.DATA_LOSS, f"shared entry's index claims {count_n} chunks of {length_n} bytes "
                            f"(at most {self.max_entry_bytes} here)")
        return count_n, length_n, digest

    def close(self) -> None:
        self.client.close()

    def remove(self, key: Key) -> None:
        """Remove an entry; one whose index is unreadable loses its index (its chunks expire)."""
        name = self.key(key)
        try:
            meta = cast(bytes | None, self.client.get(name))
            try:
                count = self._index(meta)[0] if meta else 0
            except CardError:
                count = 0
            self.client.delete(name, *[f"{name}:{i}" for i in range(count)])
        except redis.RedisError as e:
            self._failed("drop", e)
