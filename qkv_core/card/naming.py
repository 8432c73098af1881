"""What names a card and checks its parts: the content hash that is a card's id, the id of a text
handoff, the digest of a context's token ids, and the CRC32C of each chunk."""
from __future__ import annotations

import hashlib
import re
import struct

import google_crc32c

from qkv_core.card.convert import fingerprint_to_pb
from qkv_core.types import Fingerprint
from qkv_core.wire import pb

CARD_ID = re.compile(r"[0-9a-f]{64}")  # a SHA-256 in lowercase hex (card_id, text_card_id)


def crc32c(data: bytes) -> int:
    return google_crc32c.value(data)


def content_hash(header: pb.CardHeader) -> hashlib._Hash:
    """The running hash that names a card: SHA-256 over the header as sent, with card_id and
    num_chunks cleared, then every layer's data in order. The sender names its card with its
    digest and the trailer repeats it; the receiver computes it from what arrives, so an id
    cannot be claimed by other content. The same model, tokens, codec, facts and layer map
    always give the same id."""
    bare = pb.CardHeader()
    bare.CopyFrom(header)
    bare.card_id, bare.num_chunks = "", 0
    return hashlib.sha256(b"qkvcomm-card\0" + bare.SerializeToString(deterministic=True))


def text_card_id(fp: Fingerprint, context_ids: list[int]) -> str:
    """Id of a context the receiver prefilled from text (the `text` handoff); never a card's id."""
    h = hashlib.sha256(b"text\0")
    h.update(fingerprint_to_pb(fp).SerializeToString(deterministic=True))
    h.update(struct.pack(f"<{len(context_ids)}i", *context_ids))
    return h.hexdigest()


def name_card(header: pb.CardHeader, blobs: list[bytes]) -> None:
    """Set header.card_id to the content hash of the header and these layer blobs."""
    digest = content_hash(header)
    for blob in blobs:
        digest.update(blob)
    header.card_id = digest.hexdigest()


def context_digest(ids: list[int]) -> bytes:
    """SHA-256 of token ids as little-endian uint32: what a card's context_ids_sha256 holds, so that a
    reader (the vLLM connector) can check that a prompt begins with the card's context."""
    return hashlib.sha256(struct.pack(f"<{len(ids)}I", *ids)).digest()
