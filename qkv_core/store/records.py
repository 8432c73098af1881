"""What the store holds: a card as received (compact) and a card decoded for use."""
from __future__ import annotations

import re
from dataclasses import dataclass

from qkv_core.types import KVCache
from qkv_core.wire import pb

DEFAULT_TENANT = ""
TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a tenant's name (service_common.auth checks callers against it)
Key = tuple[str, str]  # (tenant, card id): a tenant sees only its own cards


@dataclass
class CardRecord:
    """A card as it came over the wire: its header and each sent layer's encoded blob."""

    header: pb.CardHeader
    blobs: list[bytes]

    @property
    def nbytes(self) -> int:
        return self.header.ByteSize() + sum(map(len, self.blobs))


@dataclass
class StoredCard:
    """A card decoded for use: the cache the receiver generates on."""

    header: pb.CardHeader
    kv: KVCache

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.kv.keys, *self.kv.values))
