"""The validating reader of a card stream: each frame is checked as it arrives (order, sizes,
CRC32C, the header against the receiver's model and limits, the digest, the card id against
the content it names), and each complete
layer is dequantized and checked for non-finite values."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from qkv_core.card.blocks import BLOCK_TOKENS, block_hashes
from qkv_core.card.convert import codec_from_pb, fingerprint_from_pb, model_details
from qkv_core.card.header import READABLE_VERSIONS
from qkv_core.card.naming import CARD_ID, content_hash, context_digest, crc32c
from qkv_core.codec import rope
from qkv_core.codec.encoding import layer_salient, rope_restored, salient_count
from qkv_core.codec.quant import dequantize, wire_size_fits
from qkv_core.codec.tensor_codec import TensorCodec
from qkv_core.config import MAX_CHUNK_BYTES, Limits
from qkv_core.errors import CardError, ErrorKind
from qkv_core.types import Fingerprint, KVCache
from qkv_core.wire import pb


class LayerMap(Protocol):
    """What a receiver holds to take cards from another model (qkv_core.engine.crossmodel.Alignment):
    the sender's fingerprint, the sender layer each receiver layer reads, and the map itself."""

    sender: Fingerprint
    sources: list[int]

    def apply(self, kv: KVCache, device: torch.device, dtype: torch.dtype) -> KVCache: ...


@dataclass
class _Layer:
    spec: pb.LayerSpec
    key: TensorCodec
    value: TensorCodec
    buf: bytearray

    @property
    def size(self) -> int:
        return self.spec.key_bytes + self.spec.value_bytes


class CardReader:
    """Validates a card frame by frame. `feed` returns the index of a layer it just completed."""

    def __init__(self, fingerprint: Fingerprint, max_card_bytes: int, alignments: Mapping[str, LayerMap] | None = None,
                 limits: Limits = Limits()):
        self.fingerprint = fingerprint
        self.max_card_bytes = max_card_bytes
        self.limits = limits
        self.alignments = alignments or {}  # by sender weights hash: the other models this receiver takes cards from
        self.alignment: LayerMap | None = None  # set when this card comes from another model
        self.source = fingerprint  # the model whose shapes the card's layers have
        self.header: pb.CardHeader | None = None
        self.layers: list[_Layer] = []
        self.wire_bytes = 0
        self._next_chunk = 0
        self._layer = 0
        self._digest: Any = None  # the content hash (a hashlib object), from the header on
        self._done = False

    def feed(self, frame: pb.CardFrame) -> int | None:
        self.wire_bytes += frame.ByteSize()
        kind = frame.WhichOneof("frame")
        if self._done:
            raise CardError(ErrorKind.INVALID, "frames after the card trailer")
        if self.header is None and kind != "header":
            raise CardError(ErrorKind.INVALID, f"a card must start with its header, got {kind or 'an empty frame'}")
        if kind == "header":
            if self.header is not None:
                raise CardError(ErrorKind.INVALID, "a second card header in one stream")
            self._read_header(frame.header)
            return None
        if kind == "chunk":
            return self._read_chunk(frame.chunk)
        if kind == "trailer":
            self._read_trailer(frame.trailer)
            return None
        raise CardError(ErrorKind.INVALID, "an empty frame")

    def finish(self) -> pb.CardHeader:
        """The validated header once the whole card has arrived; DATA_LOSS if it has not."""
        if self.header is None:
            raise CardError(ErrorKind.DATA_LOSS, "truncated card: the stream ended before the header")
        if not self._done:
            raise CardError(
                ErrorKind.DATA_LOSS,
                f"truncated card: the stream ended after {self._next_chunk} of {self.header.num_chunks} chunks",
            )
        return self.header

    def _read_header(self, h: pb.CardHeader) -> None:
        if h.format_version not in READABLE_VERSIONS:
            raise CardError(
                ErrorKind.PRECONDITION,
                f"card format version {h.format_version} is not supported; this receiver reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}",
            )
        theirs = fingerprint_from_pb(h.model)
        differ = self.fingerprint.mismatch(theirs)
        if differ:
            self.alignment = self.alignments.get(theirs.weights_sha256)
            if self.alignment is None or self.alignment.sender != theirs:
                raise CardError(
                    ErrorKind.PRECONDITION,
                    f"card was made by model {theirs.name!r} but this receiver runs {self.fingerprint.name!r}; "
                    f"they differ in {', '.join(differ)}, and no calibration for this pair is loaded (fit one with "
                    f"`qkvcomm calibrate pair --sender-model {theirs.name} --receiver-model {self.fingerprint.name}` "
                    "and start the receiver with --alignment FILE)",
                    model_details(theirs, self.fingerprint),
                )
            if h.layer_sources and list(h.layer_sources) != self.alignment.sources:
                raise CardError(
                    ErrorKind.PRECONDITION,
                    f"card maps its layers as {list(h.layer_sources)}, this receiver's alignment as "
                    f"{self.alignment.sources}",
                )
            self.source = theirs
        elif h.layer_sources:
            raise CardError(ErrorKind.PRECONDITION,
                            f"card was mapped for a receiver of {len(h.layer_sources)} layers, not this model")
        if h.context_tokens == 0 or not h.layers:
            raise CardError(ErrorKind.INVALID, "card holds no tokens or no layers")
        if not CARD_ID.fullmatch(h.card_id):
            raise CardError(ErrorKind.INVALID, "card_id must be 64 lowercase hex digits (a SHA-256)")
        self.limits.check("max_context_tokens", h.context_tokens, "the card's context")
        self.limits.check("max_fact_summary_bytes", len(h.fact_summary.encode()), "the card's fact summary (bytes)")
        self._check_blocks(h)
        own = h.context_tokens - h.parent_tokens  # the tokens the card's layers hold (a delta: after its parent's)
        if max(spec.tokens for spec in h.layers) != own:
            raise CardError(ErrorKind.INVALID, f"no layer holds the card's {own} tokens")
        if h.shared_prefix_tokens >= h.context_tokens:
            raise CardError(ErrorKind.INVALID, "the shared prefix must be shorter than the context")
        fp = self.source
        salient = list(h.salient_tokens)
        if any(b <= a for a, b in zip(salient, salient[1:])) or (salient and salient[-1] >= h.context_tokens):
            raise CardError(ErrorKind.INVALID, "salient tokens must be ascending positions inside the context")
        seen: set[int] = set()
        for spec in h.layers:
            if spec.receiver_layer >= fp.num_layers or spec.receiver_layer in seen:
                raise CardError(ErrorKind.INVALID, f"bad or repeated receiver layer {spec.receiver_layer}")
            seen.add(spec.receiver_layer)
            if not 0 < spec.tokens <= own or (h.parent_card_id and spec.tokens != own):
                raise CardError(ErrorKind.INVALID, f"layer {spec.receiver_layer} holds {spec.tokens} tokens")
            key, value = codec_from_pb(spec.key), codec_from_pb(spec.value)
            try:
                if value.pre_rope:
                    raise ValueError("values carry no RoPE to remove")
                if key.pre_rope:
                    rope.inv_freq(fp)  # the card's model must have plain RoPE to apply it again
                fits = all(
                    wire_size_fits(c, size, fp.num_kv_heads, spec.tokens, fp.head_dim,
                                   salient_count(salient, own, spec.tokens, c))
                    for size, c in ((spec.key_bytes, key), (spec.value_bytes, value))
                )
            except ValueError as e:
                raise CardError(ErrorKind.INVALID, str(e)) from e
            if not fits:
                raise CardError(ErrorKind.INVALID, f"layer {spec.receiver_layer} sizes do not match its codec")
            self.layers.append(_Layer(spec, key, value, bytearray()))
        total = sum(layer.size for layer in self.layers)
        if total != h.payload_bytes:
            raise CardError(ErrorKind.INVALID, f"payload_bytes {h.payload_bytes} != sum of layer sizes {total}")
        if total > self.max_card_bytes:
            raise CardError(ErrorKind.TOO_LARGE,
                            f"card of {total} bytes exceeds this receiver's limit of {self.max_card_bytes}")
        self.header = h
        self._digest = content_hash(h)
        self._skip_empty_layers()

    def _check_blocks(self, h: pb.CardHeader) -> None:
        """The block hashes and, for a delta card, its parent: well-formed (the parent itself is the
        receiver's to find). Block hashes are what FindPrefix answers by, so they must be the ones
        the card's own context_ids make: a card cannot claim another context's prefix."""
        if h.parent_card_id or h.parent_tokens:
            if not CARD_ID.fullmatch(h.parent_card_id) or not 0 < h.parent_tokens < h.context_tokens:
                raise CardError(ErrorKind.INVALID, "a delta card names its parent by card id and extends 1 to "
                                "context_tokens - 1 of its tokens")
            if self.alignment is not None:
                raise CardError(ErrorKind.PRECONDITION, "a delta card must come from the receiver's own model")
            if h.shared_prefix_tokens or h.salient_tokens:
                raise CardError(ErrorKind.INVALID,
                                "a delta card holds every layer, and no shared prefix or salient tokens")
        ids = list(h.context_ids)
        if ids and (len(ids) != h.context_tokens or context_digest(ids) != h.context_ids_sha256):
            raise CardError(ErrorKind.INVALID, f"the card's {len(h.context_ids)} context token ids are not its "
                            f"{h.context_tokens} tokens of digest context_ids_sha256")
        if h.parent_card_id and not ids:
            raise CardError(ErrorKind.INVALID,
                            "a delta card carries its context_ids (its parent's are checked against them)")
        if h.block_hashes:
            if not ids:
                raise CardError(ErrorKind.INVALID, "a card that names block hashes carries the context_ids they hash")
            own = block_hashes(fingerprint_from_pb(h.model), ids)[h.parent_tokens // BLOCK_TOKENS :]
            if list(h.block_hashes) != own:
                raise CardError(ErrorKind.INVALID, "the card's block hashes are not those of its context_ids")

    def _skip_empty_layers(self) -> None:
        while self._layer < len(self.layers) and self.layers[self._layer].size == 0:
            self._layer += 1

    def _read_chunk(self, c: pb.LayerChunk) -> int | None:
        if c.index != self._next_chunk:
            raise CardError(ErrorKind.DATA_LOSS, f"chunk {c.index} arrived where chunk {self._next_chunk} was expected")
        if len(c.data) > MAX_CHUNK_BYTES:
            raise CardError(ErrorKind.INVALID,
                            f"chunk {c.index} holds {len(c.data)} bytes; the limit is {MAX_CHUNK_BYTES}")
        if not c.data:
            raise CardError(ErrorKind.INVALID, f"chunk {c.index} is empty")
        if crc32c(c.data) != c.crc32c:
            raise CardError(ErrorKind.DATA_LOSS, f"chunk {c.index} fails its CRC32C check")
        if self._layer >= len(self.layers) or c.layer != self._layer:
            raise CardError(ErrorKind.INVALID, f"chunk {c.index} is for layer {c.layer}, expected layer {self._layer}")
        layer = self.layers[self._layer]
        if c.offset != len(layer.buf) or len(layer.buf) + len(c.data) > layer.size:
            raise CardError(ErrorKind.INVALID, f"chunk {c.index} does not fit layer {c.layer} at offset {c.offset}")
        layer.buf += c.data
        self._digest.update(c.data)
        self._next_chunk += 1
        if len(layer.buf) < layer.size:
            return None
        done = self._layer
        self._layer += 1
        self._skip_empty_layers()
        return done

    # --- the bulk channel: the header as a frame, then each layer's bytes whole, no chunks or trailer
    def bulk_layers(self) -> list[tuple[int, int]]:
        """(layer index, bytes) of every layer with data, in the order a bulk stream carries them."""
        return [(i, layer.size) for i, layer in enumerate(self.layers) if layer.size]

    def take_layer(self, index: int, data: bytearray) -> None:
        """A whole layer's bytes from the bulk channel, in order, into the card's digest; `decode_layer`
        may follow (hashlib lets go of the GIL, so the reading thread hashes beside the decoding)."""
        if self.header is None or self._done or index != self._layer or len(data) != self.layers[index].size:
            raise CardError(ErrorKind.INVALID, f"bulk layer {index} of {len(data)} bytes arrived out of its place")
        self.layers[index].buf = data
        self._digest.update(data)
        self.wire_bytes += len(data)
        self._layer += 1
        self._skip_empty_layers()

    def finish_bulk(self) -> None:
        """Every layer arrived on the bulk channel; DATA_LOSS unless they are the content the card's id names."""
        assert self.header is not None
        if self._layer < len(self.layers):
            raise CardError(ErrorKind.DATA_LOSS, f"the bulk stream ended before layer {self._layer}")
        if self._digest.hexdigest() != self.header.card_id:
            raise CardError(ErrorKind.DATA_LOSS, "the bulk stream's bytes are not the content the card's id names")
        self._done = True

    def _read_trailer(self, t: pb.CardTrailer) -> None:
        assert self.header is not None
        if self._layer < len(self.layers):
            raise CardError(ErrorKind.DATA_LOSS, f"trailer arrived before layer {self._layer} was complete")
        if t.num_chunks != self._next_chunk or t.num_chunks != self.header.num_chunks:
            raise CardError(ErrorKind.DATA_LOSS, f"trailer counts {t.num_chunks} chunks, {self._next_chunk} arrived")
        if t.payload_bytes != self.header.payload_bytes:
            raise CardError(ErrorKind.INVALID, "trailer payload size differs from the header's")
        digest = self._digest.digest()
        if t.sha256 != digest:
            raise CardError(ErrorKind.DATA_LOSS, "card digest mismatch")
        if self.header.card_id != digest.hex():  # intact, but named for other content: a forged or relabelled card
            raise CardError(ErrorKind.INVALID, "the card's id does not match its content")
        self._done = True

    def decoded_bytes(self, dtype: torch.dtype) -> int:
        """Memory the card's layers take once dequantized to `dtype` (what the receiver will hold)."""
        per_token = 2 * self.source.num_kv_heads * self.source.head_dim * dtype.itemsize
        parent = self.header.parent_tokens if self.header is not None else 0  # a delta is stitched onto a copy of them
        return per_token * sum(layer.spec.tokens + parent for layer in self.layers)

    def decode_layer(self, index: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantize one complete layer into (K, V) of shape [heads, tokens, dim]; INVALID if a value
        is not finite (a NaN scale or passthrough value, checksums recomputed, as any client can)."""
        layer = self.layers[index]
        shape = (self.source.num_kv_heads, layer.spec.tokens, self.source.head_dim)
        data = torch.frombuffer(layer.buf, dtype=torch.uint8).to(device)
        split = layer.spec.key_bytes
        h = self.header
        assert h is not None  # layers are read only after their header
        try:
            k, v = (
                dequantize(blob, c, shape, dtype,
                           layer_salient(h.salient_tokens, h.context_tokens, layer.spec.tokens, c))
                for blob, c in ((data[:split], layer.key), (data[split:], layer.value))
            )
        except ValueError as e:  # an entropy-coded tensor that is not what its codec implies
            raise CardError(ErrorKind.INVALID, f"layer {layer.spec.receiver_layer}: {e}") from e
        k = rope_restored(k, layer.key, self.source, h.context_tokens)
        layer.buf = bytearray()  # the dequantized tensors replace the bytes
        # NaN and inf propagate through max and min: four read-only passes, no temporary tensor
        if not bool(torch.isfinite(torch.stack([k.amax(), k.amin(), v.amax(), v.amin()])).all()):
            raise CardError(ErrorKind.INVALID,
                            f"layer {layer.spec.receiver_layer} decodes to non-finite values (NaN or Inf)")
        return k, v
