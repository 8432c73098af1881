"""CacheCard: encode a KV cache into framed, checksummed messages, and read them back safely.

A card is a header, then chunks of each layer's blob (K bytes then V bytes, as laid out
by `quant`), in layer order, each at most MAX_CHUNK_BYTES with a CRC32C, then a trailer
with the totals and a SHA-256 over the serialized header and all chunk data. A CardReader
checks every frame as it arrives, so a bad card fails at the first wrong byte with a
CardError whose kind says what went wrong; nothing is ever unpickled.
"""
from __future__ import annotations

import enum
import hashlib
import re
import struct
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import google_crc32c
import torch

from .codec import LayerCodec
from .config import MAX_CHUNK_BYTES, Limits
from .kv import KVCache
from .models import Fingerprint
from .quant import Granularity, TensorCodec, dequantize, encoded_size, fp16_windows, quantize_many
from .wire import pb

if TYPE_CHECKING:
    from .crossmodel import Alignment

FORMAT_VERSION = 1
CARD_ID = re.compile(r"[0-9a-f]{64}")  # a SHA-256 in lowercase hex (card_id, text_card_id)


class ErrorKind(enum.Enum):
    INVALID = "invalid argument"  # malformed frames or header
    PRECONDITION = "failed precondition"  # well-formed, but not for this receiver
    DATA_LOSS = "data loss"  # checksum, digest or truncation
    TOO_LARGE = "resource exhausted"
    NOT_FOUND = "not found"


class CardError(Exception):
    def __init__(self, kind: ErrorKind, message: str):
        super().__init__(message)
        self.kind = kind


def crc32c(data: bytes) -> int:
    return google_crc32c.value(data)


# --- header -------------------------------------------------------------------------------

def fingerprint_to_pb(fp: Fingerprint) -> pb.ModelFingerprint:
    return pb.ModelFingerprint(**fp.__dict__)


def fingerprint_from_pb(msg: pb.ModelFingerprint) -> Fingerprint:
    return Fingerprint(**{f: getattr(msg, f) for f in Fingerprint.__dataclass_fields__})


def _codec_to_pb(c: TensorCodec) -> pb.TensorCodec:
    return pb.TensorCodec(
        bits=c.bits, granularity=int(c.granularity), group_size=c.group_size,
        sink_tokens=c.sink_tokens, recent_tokens=c.recent_tokens, salient_bits=c.salient_bits,
    )


def codec_from_pb(msg: pb.TensorCodec) -> TensorCodec:
    try:
        return TensorCodec(
            bits=msg.bits, granularity=Granularity(msg.granularity), group_size=msg.group_size,
            sink_tokens=msg.sink_tokens, recent_tokens=msg.recent_tokens, salient_bits=msg.salient_bits,
        )
    except ValueError as e:
        raise CardError(ErrorKind.INVALID, f"bad tensor codec in card: {e}") from e


def layer_salient(positions: Sequence[int], context_tokens: int, layer_tokens: int, codec: TensorCodec) -> torch.Tensor | None:
    """The salient context positions as indices into one layer's quantized middle (a layer
    holds the last `layer_tokens` tokens of the context); None when the codec has none."""
    if not codec.salient_bits or not positions:
        return None
    sink, recent = fp16_windows(codec, layer_tokens)
    lo = context_tokens - layer_tokens + sink
    hi = context_tokens - recent
    return torch.tensor([p - lo for p in positions if lo <= p < hi], dtype=torch.long)


def _salient_count(positions: Sequence[int], context_tokens: int, layer_tokens: int, codec: TensorCodec) -> int:
    idx = layer_salient(positions, context_tokens, layer_tokens, codec)
    return 0 if idx is None else idx.numel()


def card_id(
    fp: Fingerprint, context_ids: list[int], layers: list[pb.LayerSpec], facts: str, salient: Sequence[int] = (),
    sources: Sequence[int] = (),
) -> str:
    """Content hash: the same model, tokens, codec, facts and layer map always give the same card."""
    h = hashlib.sha256()
    h.update(fingerprint_to_pb(fp).SerializeToString(deterministic=True))
    h.update(struct.pack(f"<{len(context_ids)}i", *context_ids))
    h.update(struct.pack(f"<{len(salient)}I", *salient))
    h.update(struct.pack(f"<{len(sources)}I", *sources))
    for layer in layers:
        h.update(layer.SerializeToString(deterministic=True))
    h.update(facts.encode())
    return h.hexdigest()


def text_card_id(fp: Fingerprint, context_ids: list[int]) -> str:
    """Id of a context the receiver prefilled from text (the `text` handoff); never a card's id."""
    h = hashlib.sha256(b"text\0")
    h.update(fingerprint_to_pb(fp).SerializeToString(deterministic=True))
    h.update(struct.pack(f"<{len(context_ids)}i", *context_ids))
    return h.hexdigest()


@dataclass
class CardPlan:
    """How a cache becomes a card: the codec of every layer and what else rides along."""

    codec: str  # the name the layers were allocated from
    layers: list[LayerCodec]  # one per model layer
    salient: list[int] = field(default_factory=list)  # tokenmix: positions at the salient width
    selected: list[int] | None = None  # layers sent (ascending); None: all
    shared_prefix: int = 0  # with a selection: tokens every receiver computes itself
    selection: str = ""  # how the layers were selected
    sources: list[int] = field(default_factory=list)  # cross-model: receiver layer j reads layer sources[j]
    facts: list[pb.Fact] = field(default_factory=list)
    fact_summary: str = ""

    def sent(self) -> list[int]:
        return list(range(len(self.layers))) if self.selected is None else self.selected


def build_header(fp: Fingerprint, context_ids: list[int], kv: KVCache, plan: CardPlan) -> pb.CardHeader:
    if len(plan.layers) != kv.num_layers:
        raise ValueError(f"{len(plan.layers)} layer codecs for {kv.num_layers} layers")
    layers = []
    n, salient = len(context_ids), plan.salient
    for i in plan.sent():
        c, (heads, tokens, dim) = plan.layers[i], kv.keys[i].shape
        layers.append(pb.LayerSpec(
            sender_layer=i, receiver_layer=i, key=_codec_to_pb(c.key), value=_codec_to_pb(c.value),
            key_bytes=encoded_size(c.key, heads, tokens, dim, _salient_count(salient, n, tokens, c.key)),
            value_bytes=encoded_size(c.value, heads, tokens, dim, _salient_count(salient, n, tokens, c.value)),
            tokens=tokens,
        ))
    return pb.CardHeader(
        format_version=FORMAT_VERSION,
        card_id=card_id(fp, context_ids, layers, plan.fact_summary, salient, plan.sources),
        salient_tokens=salient,
        model=fingerprint_to_pb(fp),
        context_tokens=n,
        codec=plan.codec,
        layers=layers,
        facts=plan.facts,
        fact_summary=plan.fact_summary,
        payload_bytes=sum(layer.key_bytes + layer.value_bytes for layer in layers),
        shared_prefix_tokens=plan.shared_prefix,
        layer_selection=plan.selection,
        layer_sources=plan.sources,
    )


# --- sender side --------------------------------------------------------------------------

def encode_tensors(
    tensors: list[torch.Tensor], codecs: list[TensorCodec], salient: Sequence[int] = (), context_tokens: int = 0
) -> list[torch.Tensor]:
    """Each tensor encoded with its codec; tensors sharing a codec and shape go through one
    batched quantize call."""
    batches: dict[tuple, list[int]] = defaultdict(list)
    for i, (t, c) in enumerate(zip(tensors, codecs)):
        batches[c, tuple(t.shape)].append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
    for (c, shape), members in batches.items():
        idx = layer_salient(salient, context_tokens, shape[1], c)
        for i, blob in zip(members, quantize_many([tensors[i] for i in members], c, idx)):
            out[i] = blob
    return out


def encode_layers(kv: KVCache, plan: CardPlan) -> list[bytes]:
    """Each sent layer's blob: its encoded K, then its encoded V."""
    sent = plan.sent()
    keys = encode_tensors([kv.keys[i] for i in sent], [plan.layers[i].key for i in sent], plan.salient, kv.tokens)
    values = encode_tensors([kv.values[i] for i in sent], [plan.layers[i].value for i in sent], plan.salient, kv.tokens)
    return [torch.cat([k, v]).cpu().numpy().tobytes() for k, v in zip(keys, values)]


def frames(source: pb.CardHeader, blobs: list[bytes], chunk_bytes: int = MAX_CHUNK_BYTES) -> Iterator[pb.CardFrame]:
    """The card as a stream of frames: header, chunks in layer order, trailer."""
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk size must be within 1..{MAX_CHUNK_BYTES}")
    header = pb.CardHeader(num_chunks=0)
    header.CopyFrom(source)
    header.num_chunks = sum(-(-len(b) // chunk_bytes) for b in blobs)
    digest = hashlib.sha256(header.SerializeToString(deterministic=True))
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


# --- receiver side ------------------------------------------------------------------------

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

    def __init__(self, fingerprint: Fingerprint, max_card_bytes: int, alignments: Mapping[str, Alignment] | None = None,
                 limits: Limits = Limits()):
        self.fingerprint = fingerprint
        self.max_card_bytes = max_card_bytes
        self.limits = limits
        self.alignments = alignments or {}  # by sender weights hash: the other models this receiver takes cards from
        self.alignment: Alignment | None = None  # set when this card comes from another model
        self.source = fingerprint  # the model whose shapes the card's layers have
        self.header: pb.CardHeader | None = None
        self.layers: list[_Layer] = []
        self.wire_bytes = 0
        self._next_chunk = 0
        self._layer = 0
        self._digest = hashlib.sha256()
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
        if h.format_version != FORMAT_VERSION:
            raise CardError(
                ErrorKind.PRECONDITION,
                f"card format version {h.format_version} is not supported; this receiver reads version {FORMAT_VERSION}",
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
                )
            if h.layer_sources and list(h.layer_sources) != self.alignment.sources:
                raise CardError(
                    ErrorKind.PRECONDITION,
                    f"card maps its layers as {list(h.layer_sources)}, this receiver's alignment as {self.alignment.sources}",
                )
            self.source = theirs
        elif h.layer_sources:
            raise CardError(ErrorKind.PRECONDITION, f"card was mapped for a receiver of {len(h.layer_sources)} layers, not this model")
        if h.context_tokens == 0 or not h.layers:
            raise CardError(ErrorKind.INVALID, "card holds no tokens or no layers")
        if not CARD_ID.fullmatch(h.card_id):
            raise CardError(ErrorKind.INVALID, "card_id must be 64 lowercase hex digits (a SHA-256)")
        self.limits.check("max_context_tokens", h.context_tokens, "the card's context")
        self.limits.check("max_fact_summary_bytes", len(h.fact_summary.encode()), "the card's fact summary (bytes)")
        if max(spec.tokens for spec in h.layers) != h.context_tokens:
            raise CardError(ErrorKind.INVALID, f"no layer holds the card's {h.context_tokens} context tokens")
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
            if not 0 < spec.tokens <= h.context_tokens:
                raise CardError(ErrorKind.INVALID, f"layer {spec.receiver_layer} holds {spec.tokens} tokens")
            key, value = codec_from_pb(spec.key), codec_from_pb(spec.value)
            try:
                expected = tuple(
                    encoded_size(c, fp.num_kv_heads, spec.tokens, fp.head_dim, _salient_count(salient, h.context_tokens, spec.tokens, c))
                    for c in (key, value)
                )
            except ValueError as e:
                raise CardError(ErrorKind.INVALID, str(e)) from e
            if expected != (spec.key_bytes, spec.value_bytes):
                raise CardError(ErrorKind.INVALID, f"layer {spec.receiver_layer} sizes do not match its codec")
            self.layers.append(_Layer(spec, key, value, bytearray()))
        total = sum(layer.size for layer in self.layers)
        if total != h.payload_bytes:
            raise CardError(ErrorKind.INVALID, f"payload_bytes {h.payload_bytes} != sum of layer sizes {total}")
        if total > self.max_card_bytes:
            raise CardError(ErrorKind.TOO_LARGE, f"card of {total} bytes exceeds this receiver's limit of {self.max_card_bytes}")
        self.header = h
        self._digest.update(h.SerializeToString(deterministic=True))
        self._skip_empty_layers()

    def _skip_empty_layers(self) -> None:
        while self._layer < len(self.layers) and self.layers[self._layer].size == 0:
            self._layer += 1

    def _read_chunk(self, c: pb.LayerChunk) -> int | None:
        if c.index != self._next_chunk:
            raise CardError(ErrorKind.DATA_LOSS, f"chunk {c.index} arrived where chunk {self._next_chunk} was expected")
        if len(c.data) > MAX_CHUNK_BYTES:
            raise CardError(ErrorKind.INVALID, f"chunk {c.index} holds {len(c.data)} bytes; the limit is {MAX_CHUNK_BYTES}")
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

    def _read_trailer(self, t: pb.CardTrailer) -> None:
        assert self.header is not None
        if self._layer < len(self.layers):
            raise CardError(ErrorKind.DATA_LOSS, f"trailer arrived before layer {self._layer} was complete")
        if t.num_chunks != self._next_chunk or t.num_chunks != self.header.num_chunks:
            raise CardError(ErrorKind.DATA_LOSS, f"trailer counts {t.num_chunks} chunks, {self._next_chunk} arrived")
        if t.payload_bytes != self.header.payload_bytes:
            raise CardError(ErrorKind.INVALID, "trailer payload size differs from the header's")
        if t.sha256 != self._digest.digest():
            raise CardError(ErrorKind.DATA_LOSS, "card digest mismatch")
        self._done = True

    def decoded_bytes(self, dtype: torch.dtype) -> int:
        """Memory the card's layers take once dequantized to `dtype` (what the receiver will hold)."""
        per_token = 2 * self.source.num_kv_heads * self.source.head_dim * dtype.itemsize
        return per_token * sum(layer.spec.tokens for layer in self.layers)

    def decode_layer(self, index: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantize one complete layer into (K, V) of shape [heads, tokens, dim]; INVALID if a value
        is not finite (a NaN scale or passthrough value, checksums recomputed, as any client can)."""
        layer = self.layers[index]
        shape = (self.source.num_kv_heads, layer.spec.tokens, self.source.head_dim)
        data = torch.frombuffer(layer.buf, dtype=torch.uint8).to(device)
        split = layer.spec.key_bytes
        h = self.header
        k, v = (
            dequantize(blob, c, shape, dtype, layer_salient(h.salient_tokens, h.context_tokens, layer.spec.tokens, c))
            for blob, c in ((data[:split], layer.key), (data[split:], layer.value))
        )
        layer.buf = bytearray()  # the dequantized tensors replace the bytes
        if not bool(torch.isfinite(torch.stack([k.abs().amax(), v.abs().amax()])).all()):
            raise CardError(ErrorKind.INVALID, f"layer {layer.spec.receiver_layer} decodes to non-finite values (NaN or Inf)")
        return k, v
