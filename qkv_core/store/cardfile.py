"""A card as bytes at rest: the disk tier's files and the Redis tier's values. No pickle, no
torch.load: the bytes are the card format itself and are read back through the same validating
reader as a card from the network (CRC32C per chunk, the content hash against the id).

Layout (little-endian):
    magic   8 bytes   b"QKVCARD1": plain; b"QKVSEAL1": sealed
    plain   the card's frames as sent (header, chunks, trailer), each a u32 length and then the
            serialized CardFrame
    sealed  a 12-byte random nonce, then AES-256-GCM (the tag last) of the plain frames, with the
            associated data "qkvcomm-store\\0" MODEL "\\0" TENANT "\\0" CARD_ID: an entry moved to
            another name, tenant or model does not open, nor does one under another key
"""
from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError

from qkv_core.card.framing import frames
from qkv_core.card.header import CardError, ErrorKind
from qkv_core.store.records import CardRecord, Key
from qkv_core.wire import pb

PLAIN, SEALED = b"QKVCARD1", b"QKVSEAL1"
_LENGTH = struct.Struct("<I")
NONCE_BYTES = 12


class Sealer:
    """AES-256-GCM with one key (from a file of 64 hex digits, or 32 raw bytes)."""

    def __init__(self, key: bytes):
        if len(key) != 32:
            raise ValueError("the store key must be 32 bytes (64 hex digits)")
        self._aead = AESGCM(key)

    @classmethod
    def from_file(cls, path: str) -> "Sealer":
        raw = Path(path).read_bytes()
        try:
            return cls(bytes.fromhex(raw.decode().strip()))
        except (UnicodeDecodeError, ValueError):
            return cls(raw)

    def seal(self, data: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, aad)

    def open(self, data: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], aad)
        except InvalidTag:
            raise CardError(ErrorKind.DATA_LOSS, "sealed entry fails its AES-GCM check (another key, or altered)") from None


def _aad(model: str, key: Key) -> bytes:
    tenant, card_id = key
    return b"\0".join([b"qkvcomm-store", model.encode(), tenant.encode(), card_id.encode()])


def to_bytes(record: CardRecord, model: str, key: Key, sealer: Sealer | None) -> bytes:
    plain = b"".join(_LENGTH.pack(len(b)) + b for b in (f.SerializeToString() for f in frames(record.header, record.blobs)))
    return PLAIN + plain if sealer is None else SEALED + sealer.seal(plain, _aad(model, key))


def from_bytes(data: bytes, model: str, key: Key, sealer: Sealer | None) -> Iterator[pb.CardFrame]:
    """The frames of a stored card (DATA_LOSS on a bad magic, a failed seal or a truncated frame;
    the reader they go through checks the rest)."""
    magic, body = data[:8], data[8:]
    if magic == SEALED:
        if sealer is None:
            raise CardError(ErrorKind.DATA_LOSS, "sealed entry, but this receiver has no store key")
        body = sealer.open(body, _aad(model, key))
    elif magic != PLAIN:
        raise CardError(ErrorKind.DATA_LOSS, "not a stored card (bad magic)")
    elif sealer is not None:
        raise CardError(ErrorKind.DATA_LOSS, "plain entry, but this receiver seals its store (refused)")
    offset = 0
    while offset < len(body):
        if offset + _LENGTH.size > len(body):
            raise CardError(ErrorKind.DATA_LOSS, "truncated stored card")
        (length,) = _LENGTH.unpack_from(body, offset)
        offset += _LENGTH.size
        if offset + length > len(body):
            raise CardError(ErrorKind.DATA_LOSS, "truncated stored card")
        try:
            yield pb.CardFrame.FromString(body[offset : offset + length])
        except DecodeError as e:
            raise CardError(ErrorKind.DATA_LOSS, f"undecodable frame in a stored card: {e}") from None
        offset += length
