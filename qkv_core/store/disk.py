"""The disk tier: one card file per card (qkv_core.store.cardfile) under

    DIR/MODEL/TENANT/CARD_ID.card      no store key. MODEL: 16 hex digits of the weights hash;
                                       TENANT: the tenant's name in hex ("-" for the default tenant)
    DIR/MODEL/sealed/NAME.card         with a store key: NAME is the keyed hash of tenant and card
                                       id (cardfile.Sealer.name), so file names reveal neither

written atomically (qkv_core.atomic), files 0600 in directories 0700 (the service's user alone).
What is on disk is indexed at start, so a receiver restarted on the same directory serves its
cards again. The budget counts file bytes; past it the oldest files go first.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from qkv_core.atomic import write_atomic
from qkv_core.card.naming import CARD_ID
from qkv_core.store.cardfile import Sealer, from_bytes, to_bytes
from qkv_core.store.records import TENANT, CardRecord, Key
from qkv_core.store.stats import StoreStats
from qkv_core.store.tier import Tier
from qkv_core.types import Fingerprint
from qkv_core.wire import pb

log = logging.getLogger(__name__)
SUFFIX = ".card"
SEALED_DIR = "sealed"
PRIVATE_DIR = 0o700


def namespace(fp: Fingerprint) -> str:
    """The MODEL directory (and Redis key part) of a model's cards: 16 hex digits of its weights hash."""
    return fp.weights_sha256[:16]


def _tenant_dir(tenant: str) -> str:
    return tenant.encode().hex() or "-"


def card_path(store_dir: Path, model: str, key: Key, sealer: Sealer | None = None) -> Path:
    """Where a receiver's disk tier keeps a card (also read by the vLLM connector,
    integrations/vllm): STORE_DIR/MODEL/TENANT/CARD_ID.card, or with a store key
    STORE_DIR/MODEL/sealed/NAME.card."""
    tenant, card_id = key
    if sealer is not None:
        return store_dir / model / SEALED_DIR / f"{sealer.name(model, key)}{SUFFIX}"
    return store_dir / model / _tenant_dir(tenant) / f"{card_id}{SUFFIX}"


def _listed(path: Path, sealed: bool) -> bool:
    """Whether a file found at start is one this tier wrote (in the layout of its key or no key)."""
    if path.suffix != SUFFIX or not CARD_ID.fullmatch(path.stem):
        return False
    if sealed:
        return path.parent.name == SEALED_DIR
    if path.parent.name == "-":
        return True
    try:
        return bool(TENANT.fullmatch(bytes.fromhex(path.parent.name).decode()))
    except (ValueError, UnicodeDecodeError):
        return False


class DiskTier(Tier):
    name = "disk"
    keeps_spills = True

    def __init__(self, root: Path, model: str, budget: int, sealer: Sealer | None, stats: StoreStats):
        self.root, self.model, self.budget, self.sealer, self.stats = root / model, model, budget, sealer, stats
        root.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        self.root.mkdir(mode=PRIVATE_DIR, exist_ok=True)
        self.root.chmod(PRIVATE_DIR)  # a directory made by an older version (0755) is closed too
        self._lock = threading.Lock()
        self._index: OrderedDict[Path, int] = OrderedDict()  # oldest first; the value is the file's size
        found = []
        for path in self.root.glob(f"*/*{SUFFIX}*"):
            if _listed(path, sealer is not None):
                found.append((path.stat().st_mtime_ns, path, path.stat().st_size))
            elif path.suffix != SUFFIX:
                path.unlink(missing_ok=True)  # a write cut short
            # a card file of the other layout (written with or without a key) is left alone, unserved
        for _, path, size in sorted(found):
            self._index[path] = size
        stats.set_up("disk", True)
        if found:
            log.info("disk tier %s: %d cards (%d bytes) from before", self.root, len(found), self.used)

    def path(self, key: Key) -> Path:
        return card_path(self.root.parent, self.model, key, self.sealer)

    @property
    def used(self) -> int:
        return sum(self._index.values())

    @property
    def full(self) -> bool:
        return self.used >= self.budget

    def held(self) -> tuple[int, int]:
        return self.used, len(self._index)

    def __contains__(self, key: Key) -> bool:
        return self.path(key) in self._index

    def put(self, key: Key, record: CardRecord) -> bool:
        """Write a card through; False when it cannot fit the budget at all."""
        data = to_bytes(record, self.model, key, self.sealer)
        if len(data) > self.budget:
            return False
        path = self.path(key)
        with self._lock:
            if path in self._index:
                return True
            while self._index and self.used + len(data) > self.budget:
                old, _ = self._index.popitem(last=False)
                old.unlink(missing_ok=True)
                self.stats.count("disk", "evict")
            try:
                path.parent.mkdir(mode=PRIVATE_DIR, exist_ok=True)
                write_atomic(path, data, private=True)
            except OSError as e:
                self.stats.count("disk", "error")
                log.warning("disk tier: cannot write %s: %s", path, e)
                return False
            self._index[path] = len(data)
        self.stats.count("disk", "write")
        return True

    def get(self, key: Key) -> Iterator[pb.CardFrame] | None:
        """The card's frames, to be read through the validating reader; None if not on disk."""
        path = self.path(key)
        if path not in self._index:
            return None
        try:
            data = path.read_bytes()
        except OSError:  # gone behind our back: not a card any more
            self.remove(key)
            return None
        return from_bytes(data, self.model, key, self.sealer)

    def remove(self, key: Key) -> None:
        path = self.path(key)
        with self._lock:
            self._index.pop(path, None)
            path.unlink(missing_ok=True)
