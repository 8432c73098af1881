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

Whatever the tier, the first frame must be the header of the card asked for (sealed or not), and
the reader then checks the content against that id: an entry written under another card's name
is refused, never served for it. With a key, the names entries are stored under are keyed hashes
(`Sealer.name`: HMAC-SHA256 of model, tenant and card id under a key derived from the store key),
so a reader of the disk or of Redis learns neither tenants nor card ids.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError

from qkv_core.card.framing import frames
from qkv_core.errors import CardError, ErrorKind
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
        self._names = hashlib.sha256(b"qkvcomm-store-names\0" + key).digest()  # never the sealing key itself

    @classmethod
    def from_file(cls, path: str) -> Sealer:
        raw = Path(path).read_bytes()
        try:
            return cls(bytes.fromhex(raw.decode().strip()))
        except (UnicodeDecodeError, ValueError):
            return cls(raw)

    def name(self, model: str, key: Key) -> str:
        """The keyed name an entry is stored under: 64 hex digits that only a holder of the key can
        compute from (model, tenant, card id)."""
        return hmac.new(self._names, _aad(model, key), hashlib.sha256).hexdigest()

    def seal(self, data: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, aad)

    def open(self, data: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], aad)
        except InvalidTag:
            raise CardError(ErrorKind.DATA_LOSS,
                            "sealed entry fails its AES-GCM check (another key, or altered)") from None


def _aad(model: str, key: Key) -> bytes:
    tenant, card_id = key
    return b"\0".join([b"qkvcomm-store", model.encode(), tenant.encode(), card_id.encode()])


def to_bytes(record: CardRecord, model: str, key: Key, sealer: Sealer | None) -> bytes:
    plain = b"".join(_LENGTH.pack(len(b)) + b
                     for b in (f.SerializeToString() for f in frames(record.header, record.blobs)))
    return PLAIN + plain if sealer is None else SEALED + sealer.seal(plain, _aad(model, key))


def from_bytes(data: bytes, model: str, key: Key, sealer: Sealer | None) -> Iterator[pb.CardFrame]:
    """The frames of a stored card (DATA_LOSS on a bad magic, a failed seal, a truncated frame or
    a header of another card than `key` names; the reader they go through checks the rest)."""
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
            frame = pb.CardFrame.FromString(body[offset : offset + length])
        except DecodeError as e:
            raise CardError(ErrorKind.DATA_LOSS, f"undecodable frame in a stored card: {e}") from None
        if offset == _LENGTH.size and (frame.WhichOneof("frame") != "header" or frame.header.card_id != key[1]):
            raise CardError(ErrorKind.DATA_LOSS, f"the entry stored as card {key[1][:12]} holds another card")
        yield frame
        offset += length
