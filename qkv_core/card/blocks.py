"""Token blocks: how a context's prefixes are named, so that a receiver can say which prefix of a
new context it already holds and a sender can send only the rest (a delta card).

A context's token ids are cut into blocks of BLOCK_TOKENS; a trailing partial block has no hash.
Block i's hash is chained, as vLLM and LMCache key their KV blocks:

    h_-1 = SHA-256("qkvcomm-blocks\\0" + weights_sha256 + "\\0" + tokenizer_sha256)
    h_i  = SHA-256(h_{i-1} + ids[16i : 16(i+1)] as little-endian uint32)

so one 32-byte hash names a model and a whole prefix: two contexts share block i's hash exactly
when they share their first 16(i+1) tokens (and the model). A card carries the hashes of the
blocks it adds (CardHeader.block_hashes); FindPrefix takes all of a context's.
"""
from __future__ import annotations

import hashlib
import struct

from qkv_core.types import Fingerprint

BLOCK_TOKENS = 16
HASH_BYTES = 32


def block_hashes(fp: Fingerprint, ids: list[int]) -> list[bytes]:
    """The chained hash of every whole block of `ids`."""
    h = hashlib.sha256(b"qkvcomm-blocks\0" + f"{fp.weights_sha256}\0{fp.tokenizer_sha256}".encode()).digest()
    out = []
    for start in range(0, len(ids) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        h = hashlib.sha256(h + struct.pack(f"<{BLOCK_TOKENS}I", *ids[start : start + BLOCK_TOKENS])).digest()
        out.append(h)
    return out


def extendable(held_tokens: int, context_tokens: int) -> int:
    """How many of `held_tokens` common tokens a delta can extend: at least one token must be new."""
    return min(held_tokens, context_tokens - 1)
