"""CacheCard header: what a card declares (format version, content id, model, per-layer codecs
and sizes) and the sender's plan that fills it. Its id is qkv_core.card.naming's, the wire form of
its model and codecs qkv_core.card.convert's.

A card is a header, then chunks of each layer's blob (K bytes then V bytes, as laid out by
`qkv_core.codec.quant`), in layer order, each at most MAX_CHUNK_BYTES with a CRC32C, then a
trailer with the totals and a SHA-256 over the serialized header and all chunk data
(qkv_core.card.framing). A CardReader (qkv_core.card.reader) checks every frame as it arrives,
so a bad card fails at the first wrong byte with a CardError whose kind says what went wrong;
nothing is ever unpickled.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qkv_core.card.blocks import BLOCK_TOKENS, block_hashes
from qkv_core.card.convert import codec_to_pb, fingerprint_to_pb
from qkv_core.card.naming import context_digest, name_card
from qkv_core.codec.encoding import encode_layers
from qkv_core.codec.registry import LayerCodec
from qkv_core.codec.tensor_codec import TensorCodec
from qkv_core.codec.tools import TOOLS
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
