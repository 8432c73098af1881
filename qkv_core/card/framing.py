"""A card as a stream of frames: header, chunks of at most MAX_CHUNK_BYTES in layer order, each
with its CRC32C, then the trailer with the totals and the content hash of header and data
(header.content_hash: the digest the card id names)."""
from __future__ import annotations

from collections.abc import Iterator

from qkv_core.card.header import content_hash, crc32c
from qkv_core.config import MAX_CHUNK_BYTES
from qkv_core.wire import pb


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
