"""Cards as the connector reads them: from a receiver's disk tier, validated and decoded.

The receiver writes each card it holds to `store_dir/<namespace>/<tenant>/<card_id>.card`
(qkv_core.store.disk; sealed with AES-GCM when it has a `store_key`). This module only reads
those files, through the same validating reader the receiver uses (CRC32C per chunk, the
content hash), and never writes or deletes there. A card is accepted only for a vLLM model of
the card's shape (layers, KV heads, head dim), and only for a prompt that begins with the card's
context (the SHA-256 of its token ids is in the header).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qkv_core.card.convert import fingerprint_from_pb
from qkv_core.card.naming import context_digest
from qkv_core.card.reader import CardReader
from qkv_core.errors import CardError, ErrorKind
from qkv_core.store.cardfile import Sealer, from_bytes
from qkv_core.store.disk import card_path
from qkv_core.store.records import DEFAULT_TENANT
from qkv_core.wire import pb

MAX_CARD_BYTES = 8 << 30


@dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    head_dim: int


@dataclass
class Card:
    header: pb.CardHeader
    keys: list[torch.Tensor]  # per layer (kv_heads, tokens, head_dim)
    values: list[torch.Tensor]

    @property
    def tokens(self) -> int:
        return self.header.context_tokens


class CardFiles:
    """Read-only view of one receiver's disk tier."""

    def __init__(self, store_dir: str, namespace: str, store_key: str = ""):
        self.store_dir, self.namespace = Path(store_dir), namespace
        self.sealer = Sealer.from_file(store_key) if store_key else None

    def path(self, card_id: str, tenant: str = DEFAULT_TENANT) -> Path:
        return card_path(self.store_dir, self.namespace, (tenant, card_id), self.sealer)

    def load(self, card_id: str, shape: Shape, tenant: str = DEFAULT_TENANT) -> Card:
        """The card decoded (fp32, CPU); CardError if it is absent, damaged or of another shape."""
        try:
            data = self.path(card_id, tenant).read_bytes()
        except OSError as e:
            raise CardError(ErrorKind.NOT_FOUND, f"card {card_id} is not in {self.store_dir}: {e.strerror}") from None
        frames = list(from_bytes(data, self.namespace, (tenant, card_id), self.sealer))
        header = frames[0].header
        if header.parent_card_id:
            raise CardError(ErrorKind.PRECONDITION, f"card {card_id} is a delta card (it extends "
                            f"{header.parent_card_id[:12]}); the connector loads whole cards")
        fp = fingerprint_from_pb(header.model)
        if (fp.num_layers, fp.num_kv_heads, fp.head_dim) != (shape.layers, shape.kv_heads, shape.head_dim):
            raise CardError(ErrorKind.PRECONDITION, f"card {card_id} is from {fp.name} ({fp.num_layers} layers, "
                            f"{fp.num_kv_heads} KV heads x {fp.head_dim}); this engine runs {shape}")
        reader = CardReader(fp, MAX_CARD_BYTES)
        keys: list[torch.Tensor | None] = [None] * fp.num_layers
        values: list[torch.Tensor | None] = [None] * fp.num_layers
        for frame in frames:
            if (ready := reader.feed(frame)) is not None:
                layer = reader.layers[ready].spec.receiver_layer
                keys[layer], values[layer] = reader.decode_layer(ready, torch.device("cpu"), torch.float32)
        header = reader.finish()
        if any(k is None for k in keys) or header.shared_prefix_tokens:
            raise CardError(ErrorKind.PRECONDITION, f"card {card_id} is layer-selected; vLLM needs every layer")
        return Card(header, keys, values)

    def covers(self, card: Card, prompt: list[int]) -> bool:
        """Whether `prompt` begins with the card's context (by the digest the header carries)."""
        n = card.tokens
        return len(card.header.context_ids_sha256) == 32 and len(prompt) > n and \
            context_digest(list(prompt[:n])) == card.header.context_ids_sha256
