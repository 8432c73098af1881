"""Multi-hop handoff (QKVShare's test): a cache passed along a chain of agents.

Agent 1 prefills the context. Each later agent takes the cumulative cache as a card (encoded
with the codec, then decoded: the wire round trip), appends its own turn, a short note it
generates itself, and hands the grown cache on, re-encoded. After `hops` handoffs the last
agent answers the question on top of everything, so the context has been quantized `hops`
times and every note a few times less.

With `deltas`, each hop after the first sends a delta card: only its own note, on top of the card
it received (which the next agent holds as well: a shared store tier, or the card passed on as it
arrived). Every token is then quantized once, by the agent that computed it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qkv_core.card.framing import frames
from qkv_core.card.header import build_card
from qkv_core.codec.registry import Codec
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.sender import Parent, SenderEngine
from qkv_core.errors import RequestError
from qkv_core.model.kv import generate, prefill
from qkv_core.model.prompt import encode
from qkv_core.store.records import StoredCard
from qkv_core.types import KVCache

NOTE_TOKENS = 12


@dataclass
class Chain:
    kv: KVCache
    ids: list[int]
    card_id: str = ""  # the last handoff's card, in the receiver's store
    wire_bytes: list[int] = field(default_factory=list)  # per handoff (a delta: its own tokens only)
    notes: list[str] = field(default_factory=list)


def handoff(sender: SenderEngine, receiver: ReceiverEngine, chain: Chain, codec: Codec, parent: Parent | None = None,
            ) -> StoredCard:
    """Encode the chain's cache as a card (with `parent`, a delta) and take it in at the receiver;
    returns what arrived."""
    kv, plan = sender.plan(codec, chain.ids, chain.kv, None, parent=parent)
    stream = list(frames(*build_card(sender.lm.fingerprint, chain.ids, kv, plan)))
    chain.wire_bytes.append(sum(f.ByteSize() for f in stream))
    card = receiver.accept(stream)
    chain.card_id = card.header.card_id
    return card


def run_chain(sender: SenderEngine, receiver: ReceiverEngine, context: str, codec: str, hops: int,
              deltas: bool = False) -> Chain:
    """The cache the last agent holds after `hops` handoffs (hops >= 1; 1 = the plain kv mode)."""
    parsed = sender.codec(codec)
    if parsed.kind is not None and parsed.kind.needs_probe:
        raise RequestError(f"{parsed.kind.allocator} needs the sender's attention probe; a relayed cache has none")
    lm = sender.lm
    ids = sender.context_ids(context)
    chain = Chain(prefill(lm, ids)[0], ids)
    parent = None
    for hop in range(2, hops + 1):
        kv = handoff(sender, receiver, chain, parsed, parent).kv
        parent = Parent(chain.card_id, len(chain.ids)) if deltas else None
        lead = encode(lm.tokenizer, f"Note from agent {hop}:")
        note = lm.tokenizer.decode(list(generate(lm, kv, lead, NOTE_TOKENS))).split("\n")[0].rstrip()
        turn = lead + encode(lm.tokenizer, note + "\n")  # ends on a newline, like the context part
        chain.notes.append(lm.tokenizer.decode(turn))
        chain.kv, _ = prefill(lm, turn, past=kv)
        chain.ids = chain.ids + turn
    handoff(sender, receiver, chain, parsed, parent)
    return chain


def context_drift(sender: SenderEngine, receiver: ReceiverEngine, context: str, codec: str, hops: int,
                  deltas: bool = False) -> float:
    """How far the context's cache has moved from agent 1's after `hops` handoffs: the relative
    error ||K' - K|| / ||K|| (and the same for V), averaged over layers and K/V."""
    ids = sender.context_ids(context)
    first, _ = prefill(sender.lm, ids)
    kv = receiver.card(run_chain(sender, receiver, context, codec, hops, deltas).card_id).kv
    n = len(ids)
    errors = [float((a[:, :n].float() - b.float()).norm() / b.float().norm())
              for a, b in zip(kv.keys + kv.values, first.keys + first.values)]
    return sum(errors) / len(errors)
