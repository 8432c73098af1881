"""A card as a stream of frames: header, chunks of at most MAX_CHUNK_BYTES in layer order, each
with its CRC32C, then the trailer with the totals and the content hash of header and data
(naming.content_hash: the digest the card id names)."""
from __future__ import annotations

from collections.abc import Iterator

from qkv_core.card.header import CardPlan, card_header
from qkv_core.card.naming import content_hash, crc32c
from qkv_core.codec.registry import LayerCodec
from qkv_core.codec.tensor_codec import FP16_BITS, TensorCodec
from qkv_core.config import MAX_CHUNK_BYTES
from qkv_core.types import Fingerprint, KVCache
from qkv_core.wire import pb

_WIDEST = 2**32 - 1  # the largest value of a count or size field: its varint is as long as any
# a layer spec's bytes for its tensors' tools: rotation seed, entropy coder, pre-RoPE, outliers, side
# bits, and up to 16 non-uniform levels (LLOYD has none above 4 bits), for K and V
_TOOL_FIELDS = 2 * (16 + 3 + 4 * 16)


def frames(source: pb.CardHeader, blobs: list[bytes], chunk_bytes: int = MAX_CHUNK_BYTES) -> Iterator[pb.CardFrame]:
    """The card as a stream of frames: header, chunks in layer order, trailer."""
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk size must be within 1..{MAX_CHUNK_BYTES}")
    header = pb.CardHeader(num_chunks=0)
    header.CopyFrom(source)
    header.num_chunks = sum(-(-len(b) // chunk_bytes) for b in blobs)
    digest = content_hash(header)
    yield pb.CardFrame(header=header)
    index = 0
    for layer, blob in enumerate(blobs):
        for offset in range(0, len(blob), chunk_bytes):
            data = blob[offset : offset + chunk_bytes]
            digest.update(data)
            yield pb.CardFrame(chunk=pb.LayerChunk(
                index=index, layer=layer, offset=offset, data=data, crc32c=crc32c(data),
            ))
            index += 1
    yield pb.CardFrame(trailer=pb.CardTrailer(
        num_chunks=index, payload_bytes=sum(map(len, blobs)), sha256=digest.digest(),
    ))


def overhead_bound(fp: Fingerprint, context_ids: list[int], kv: KVCache, codec: str) -> int:
    """An upper bound on the bytes a card of `kv` takes besides its layers' payload: the header
    frame (every layer's spec, no facts), each chunk's framing, the trailer. An allocator's
    budget pays for them too."""
    n = kv.num_layers
    wide = TensorCodec(FP16_BITS)
    header = card_header(fp, context_ids, kv, CardPlan(codec, [LayerCodec(wide, wide)] * n), [(_WIDEST, _WIDEST)] * n)
    header.card_id, header.num_chunks, header.payload_bytes = "0" * 64, _WIDEST, 2**40
    # every layer's blob starts one, and the rest at most one per MAX_CHUNK_BYTES
    chunks = n + kv.nbytes(2) // MAX_CHUNK_BYTES + 1
    chunk = pb.CardFrame(chunk=pb.LayerChunk(index=_WIDEST, layer=n, offset=_WIDEST, data=b"",
                                             crc32c=_WIDEST)).ByteSize() + 5
    trailer = pb.CardFrame(trailer=pb.CardTrailer(num_chunks=_WIDEST, payload_bytes=2**40, sha256=bytes(32)))
    return pb.CardFrame(header=header).ByteSize() + n * _TOOL_FIELDS + chunks * chunk + trailer.ByteSize()
