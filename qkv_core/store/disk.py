"""The disk tier: one card file per card (qkv_core.store.cardfile) under

    DIR/MODEL/TENANT/CARD_ID.card      MODEL: 16 hex digits of the weights hash; TENANT: the
                                       tenant's name in hex ("-" for the default tenant)

written atomically (qkv_core.atomic). What is on disk is indexed at start, so a
receiver restarted on the same directory serves its cards again. The budget counts file bytes;
past it the oldest files go first.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from qkv_core.atomic import write_atomic
from qkv_core.card.header import CARD_ID
from qkv_core.store.cardfile import Sealer, from_bytes, to_bytes
from qkv_core.store.records import CardRecord, Key
from qkv_core.store.stats import StoreStats
from qkv_core.types import Fingerprint
from qkv_core.wire import pb

log = logging.getLogger(__name__)
SUFFIX = ".card"


def namespace(fp: Fingerprint) -> str:
    """The MODEL directory (and Redis key part) of a model's cards: 16 hex digits of its weights hash."""
    return fp.weights_sha256[:16]


def _tenant_dir(tenant: str) -> str:
    return tenant.encode().hex() or "-"


def card_path(store_dir: Path, model: str, key: Key) -> Path:
    """Where a receiver's disk tier keeps a card: STORE_DIR/MODEL/TENANT/CARD_ID.card (also read by
    the vLLM connector, integrations/vllm)."""
    tenant, card_id = key
    return store_dir / model / _tenant_dir(tenant) / f"{card_id}{SUFFIX}"


class DiskTier:
    def __init__(self, root: Path, model: str, budget: int, sealer: Sealer | None, stats: StoreStats):
        self.root, self.model, self.budget, self.sealer, self.stats = root / model, model, budget, sealer, stats
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index: OrderedDict[Key, int] = OrderedDict()  # oldest first; the value is the file's size
        found = []
        for path in self.root.glob(f"*/*{SUFFIX}*"):
            if path.suffix != SUFFIX or not CARD_ID.fullmatch(path.stem):
                path.unlink(missing_ok=True)  # a write cut short, or not ours to serve
                continue
            name = path.parent.name
            tenant = "" if name == "-" else bytes.fromhex(name).decode()
            found.append((path.stat().st_mtime_ns, (tenant, path.stem), path.stat().st_size))
        for _, key, size in sorted(found):
            self._index[key] = size
        stats.set_up("disk", True)
        if found:
            log.info("disk tier %s: %d cards (%d bytes) from before", self.root, len(found), self.used)

    def path(self, key: Key) -> Path:
        return card_path(self.root.parent, self.model, key)

    @property
    def used(self) -> int:
        return sum(self._index.values())

    @property
    def full(self) -> bool:
        return self.used >= self.budget

    def __contains__(self, key: Key) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def write(self, key: Key, record: CardRecord) -> bool:
        """Write a card through; False when it cannot fit the budget at all."""
        data = to_bytes(record, self.model, key, self.sealer)
        if len(data) > self.budget:
            return False
        with self._lock:
            if key in self._index:
                return True
            while self._index and self.used + len(data) > self.budget:
                old, _ = self._index.popitem(last=False)
                self.path(old).unlink(missing_ok=True)
                self.stats.count("disk", "evict")
            path = self.path(key)
            path.parent.mkdir(exist_ok=True)
            try:
                write_atomic(path, data)
            except OSError as e:
                self.stats.count("disk", "error")
                log.warning("disk tier: cannot write %s: %s", path, e)
                return False
            self._index[key] = len(data)
        self.stats.count("disk", "write")
        return True

    def read(self, key: Key) -> Iterator[pb.CardFrame] | None:
        """The card's frames, to be read through the validating reader; None if not on disk."""
        if key not in self._index:
            return None
        try:
            data = self.path(key).read_bytes()
        except OSError:  # gone behind our back: not a card any more
            self.drop(key)
            return None
        return from_bytes(data, self.model, key, self.sealer)

    def drop(self, key: Key) -> None:
        with self._lock:
            self._index.pop(key, None)
            self.path(key).unlink(missing_ok=True)
