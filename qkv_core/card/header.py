"""CacheCard header: what a card declares (format version, content id, model, per-layer codecs
and sizes), the sender's plan that fills it, and the error kinds every card check reports.

A card is a header, then chunks of each layer's blob (K bytes then V bytes, as laid out by
`qkv_core.codec.quant`), in layer order, each at most MAX_CHUNK_BYTES with a CRC32C, then a
trailer with the totals and a SHA-256 over the serialized header and all chunk data
(qkv_core.card.framing). A CardReader (qkv_core.card.reader) checks every frame as it arrives,
so a bad card fails at the first wrong byte with a CardError whose kind says what went wrong;
nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import google_crc32c

from qkv_core.card.blocks import BLOCK_TOKENS, block_hashes
from qkv_core.codec.encoding import encode_layers
from qkv_core.codec.registry import LayerCodec
from qkv_core.codec.tensor_codec import Granularity, TensorCodec
from qkv_core.codec.tools import TOOLS
from qkv_core.errors import CardError, ErrorKind
from qkv_core.types import Fingerprint, KVCache
from qkv_core.wire import pb

# 2: the card id and the trailer digest are the content hash; each codec tool names the version
# that brought it (qkv_core.codec.tools: 3 rotated, entropy coded, pre-RoPE; 4 non-uniform levels,
# outliers, compact side information). A card is written as the oldest version whose readers undo
# every tool it uses, so older receivers keep reading what they can and refuse the rest
# (PRECONDITION) instead of ignoring a field they do not know and decoding it wrong.
PLAIN_FORMAT_VERSION = 2
FORMAT_VERSION = max(PLAIN_FORMAT_VERSION, *(t.version for t in TOOLS))  # the newest this code reads and writes
READABLE_VERSIONS = tuple(range(PLAIN_FORMAT_VERSION, FORMAT_VERSION + 1))
CARD_ID = re.compile(r"[0-9a-f]{64}")  # a SHA-256 in lowercase hex (card_id, text_card_id)


def crc32c(data: bytes) -> int:
    return google_crc32c.value(data)


# --- header -------------------------------------------------------------------------------

def model_details(sender: Fingerprint, receiver: Fingerprint) -> dict[str, str]:
    """The ErrorInfo metadata of a model mismatch: both models, by name and weights hash."""
    return {"sender_model": sender.name, "sender_weights": sender.weights_sha256[:16],
            "receiver_model": receiver.name, "receiver_weights": receiver.weights_sha256[:16],
            "differ_in": ",".join(receiver.mismatch(sender))}


def fingerprint_to_pb(fp: Fingerprint) -> pb.ModelFingerprint:
    return pb.ModelFingerprint(**fp.__dict__)


def fingerprint_from_pb(msg: pb.ModelFingerprint) -> Fingerprint:
    return Fingerprint(**{f: getattr(msg, f) for f in Fingerprint.__dataclass_fields__})


def codec_to_pb(c: TensorCodec) -> pb.TensorCodec:
    """The wire form of a tensor codec: its base fields, then each tool's field (qkv_core.codec.tools)."""
    base: dict[str, Any] = {
        "bits": c.bits, "granularity": int(c.granularity), "group_size": c.group_size,
        "sink_tokens": c.sink_tokens, "recent_tokens": c.recent_tokens, "salient_bits": c.salient_bits}
    return pb.TensorCodec(**base, **{t.proto_field: t.to_wire(getattr(c, t.field)) for t in TOOLS
                                     if t.proto_field not in base})


def codec_from_pb(msg: pb.TensorCodec) -> TensorCodec:
    try:
        base: dict[str, Any] = {
            "bits": msg.bits, "granularity": Granularity(msg.granularity), "group_size": msg.group_size,
            "sink_tokens": msg.sink_tokens, "recent_tokens": msg.recent_tokens, "salient_bits": msg.salient_bits}
        return TensorCodec(**base, **{t.field: t.from_wire(getattr(msg, t.proto_field)) for t in TOOLS
                                      if t.field not in base})
    except ValueError as e:
        raise CardError(ErrorKind.INVALID, f"bad tensor codec in card: {e}") from e


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
    parent_card_id: str = ""  # a delta card: the held card whose first parent_tokens tokens it extends
    parent_tokens: int = 0  # the cache encoded holds only the tokens after these

    def sent(self) -> list[int]:
        return list(range(len(self.layers))) if self.selected is None else self.selected

    def encode(self, kv: KVCache, fp: Fingerprint | None = None) -> list[tuple[bytes, bytes]]:
        """The encoded (K, V) of the layers this plan sends (`fp`: the model, for pre-RoPE keys)."""
        return encode_layers(kv, self.layers, self.sent(), self.salient, fp, self.parent_tokens + kv.tokens)


def build_card(fp: Fingerprint, context_ids: list[int], kv: KVCache,
               plan: CardPlan) -> tuple[pb.CardHeader, list[bytes]]:
    """The card of `kv` under `plan`: its header, named by its content, and its layer blobs. A delta
    plan (parent_card_id) takes the cache of the tokens after parent_tokens only."""
    _check_plan(context_ids, kv, plan)
    tensors = plan.encode(kv, fp)
    header = card_header(fp, context_ids, kv, plan, [(len(k), len(v)) for k, v in tensors])
    blobs = [k + v for k, v in tensors]
    name_card(header, blobs)
    return header, blobs


def name_card(header: pb.CardHeader, blobs: list[bytes]) -> None:
    """Set header.card_id to the content hash of the header and these layer blobs."""
    digest = content_hash(header)
    for blob in blobs:
        digest.update(blob)
    header.card_id = digest.hexdigest()


def _check_plan(context_ids: list[int], kv: KVCache, plan: CardPlan) -> None:
    if len(plan.layers) != kv.num_layers:
        raise ValueError(f"{len(plan.layers)} layer codecs for {kv.num_layers} layers")
    if plan.parent_card_id and (plan.salient or plan.selected is not None or plan.sources
                                or kv.tokens != len(context_ids) - plan.parent_tokens or kv.is_ragged):
        raise ValueError("a delta card holds every layer's tokens after its parent's, and no salient tokens")


def format_version(codecs: list[TensorCodec]) -> int:
    """The oldest card format whose readers undo every tool of `codecs`."""
    return max([PLAIN_FORMAT_VERSION, *(t.version for t in TOOLS for c in codecs if t.on(c))])


def card_header(fp: Fingerprint, context_ids: list[int], kv: KVCache, plan: CardPlan,
                sizes: list[tuple[int, int]]) -> pb.CardHeader:
    """The header of the card; `sizes`: each sent layer's (K, V) bytes as encoded."""
    layers = [
        pb.LayerSpec(sender_layer=i, receiver_layer=i, key=codec_to_pb(plan.layers[i].key),
                     value=codec_to_pb(plan.layers[i].value), key_bytes=k, value_bytes=v, tokens=kv.keys[i].shape[1])
        for i, (k, v) in zip(plan.sent(), sizes)
    ]
    return pb.CardHeader(
        format_version=format_version([c for i in plan.sent() for c in (plan.layers[i].key, plan.layers[i].value)]),
        salient_tokens=plan.salient,
        model=fingerprint_to_pb(fp),
        context_tokens=len(context_ids),
        codec=plan.codec,
        layers=layers,
        facts=plan.facts,
        fact_summary=plan.fact_summary,
        payload_bytes=sum(layer.key_bytes + layer.value_bytes for layer in layers),
        shared_prefix_tokens=plan.shared_prefix,
        layer_selection=plan.selection,
        layer_sources=plan.sources,
        context_ids_sha256=context_digest(context_ids),
        context_ids=context_ids,
        # the blocks ending after the parent
        block_hashes=block_hashes(fp, context_ids)[plan.parent_tokens // BLOCK_TOKENS :],
        parent_card_id=plan.parent_card_id,
        parent_tokens=plan.parent_tokens,
    )


def context_digest(ids: list[int]) -> bytes:
    """SHA-256 of token ids as little-endian uint32: what a card's context_ids_sha256 holds, so that a
    reader (the vLLM connector) can check that a prompt begins with the card's context."""
    return hashlib.sha256(struct.pack(f"<{len(ids)}I", *ids)).digest()


