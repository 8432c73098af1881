"""Delta cards with the tiny model: block hashes, the prefix index, the sender's prefix reuse,
stitching at the receiver, refusals, and sessions. The services' dialogue is in test_dialogue.py."""
from __future__ import annotations

import pytest
import torch
from conftest import resigned, tiny_model

from qkv_core.card.blocks import BLOCK_TOKENS, block_hashes, extendable
from qkv_core.card.framing import frames
from qkv_core.config import Limits
from qkv_core.engine import sender as sender_module
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.sender import Parent, SenderEngine
from qkv_core.engine.sessions import Sessions
from qkv_core.errors import CardError, ErrorKind, RequestError
from qkv_core.model.kv import next_logits, prefill
from qkv_core.store.prefixes import MAX_CHAIN, PrefixIndex
from qkv_core.wire import pb

DOC = " ".join(f"Depot {i} in sector {i} holds {100 + 7 * i} crates and opens at {i % 12 + 1} o'clock."
               for i in range(14))
TURNS = [DOC, "The summit moved to Lyon on 4 May.", "Bulk exports moved to the v4 endpoint; the rate limit is 600."]


def _transcript(n: int) -> str:
    return "\n".join(TURNS[:n])


def _push(receiver: ReceiverEngine, card, tenant: str = ""):
    return receiver.accept(frames(card.header, card.blobs), tenant=tenant)


def _cool(store) -> None:
    """Drop every decoded cache: the next use decodes the compact form."""
    for key in store.hot.coldest():
        store.hot.pop(key)


def _parent(receiver: ReceiverEngine, sender: SenderEngine, context: str, tenant: str = "") -> Parent:
    ids = sender.context_ids(context)
    found = receiver.find_prefix(sender.block_hashes(ids), tenant)
    assert found is not None
    return Parent(found[0], extendable(found[1], len(ids)))


def test_block_hashes_name_a_model_and_a_whole_prefix(tiny):
    ids = list(range(3, 3 + 5 * BLOCK_TOKENS + 7))
    hashes = block_hashes(tiny.fingerprint, ids)
    assert len(hashes) == 5 and all(len(h) == 32 for h in hashes)  # the trailing 7 tokens make no block
    changed = ids[:]
    changed[2 * BLOCK_TOKENS + 1] += 1  # one token of block 2
    other = block_hashes(tiny.fingerprint, changed)
    assert other[:2] == hashes[:2] and not set(other[2:]) & set(hashes)  # chained: every later block differs
    assert not set(block_hashes(tiny_model(seed=1).fingerprint, ids)) & set(hashes)  # another model's weights


def test_the_prefix_index_finds_the_longest_held_prefix_per_tenant():
    index = PrefixIndex(max_blocks=6)
    a = [bytes([i]) * 32 for i in range(4)]
    index.add("", pb.CardHeader(card_id="A", block_hashes=a, codec="fp16"))
    index.add("", pb.CardHeader(card_id="B", block_hashes=[b"\x09" * 32], parent_tokens=4 * BLOCK_TOKENS,
                                codec="kivi-2"))
    held = {"A", "B"}
    assert index.longest("", a + [b"\x09" * 32], held.__contains__) == ("B", 5 * BLOCK_TOKENS)
    assert index.longest("", a + [b"\x09" * 32], held.__contains__, {"kivi-4", "fp16"}) == ("A", 4 * BLOCK_TOKENS)
    assert index.longest("", a[:3] + [b"\x07" * 32], held.__contains__) == ("A", 3 * BLOCK_TOKENS)
    assert index.longest("bob", a, held.__contains__) is None  # another tenant's cards
    held.discard("B")
    assert index.longest("", a + [b"\x09" * 32], held.__contains__) == ("A", 4 * BLOCK_TOKENS)
    assert len(index) == 4  # B's entry went when it was found gone
    index.add("", pb.CardHeader(card_id="C", block_hashes=[bytes([20 + i]) * 32 for i in range(4)]))
    assert len(index) == 6 and index.longest("", a[:2], held.__contains__) is None  # the oldest went first


def test_the_sender_prefills_only_what_follows_a_cached_prefix(tiny, monkeypatch):
    sender = SenderEngine(tiny, cache_bytes=1 << 24)
    first = sender.context_ids(_transcript(1))
    sender.prefill(first)
    seen = []
    real = sender_module.prefill
    monkeypatch.setattr(sender_module, "prefill", lambda lm, ids, past=None,
                        **kw: seen.append(len(ids)) or real(lm, ids, past, **kw))
    ids = sender.context_ids(_transcript(2))
    assert ids[: len(first)] == first  # the prompt cuts after a newline: the turn extends the tokens
    kv, _ = sender.prefill(ids)
    reused = len(first) // BLOCK_TOKENS * BLOCK_TOKENS
    assert seen == [len(ids) - reused]
    full, _ = prefill(tiny, ids)
    assert max(float((a - b).abs().max()) for a, b in zip(kv.keys + kv.values, full.keys + full.values)) < 1e-5


@pytest.mark.parametrize("codec", ["fp32", "fp32+prerope", "kivi-4"])
def test_a_delta_card_stitches_into_the_cache_of_the_whole_context(tiny, codec):
    """(fp32+prerope: a delta's keys had RoPE removed at their own positions, after the parent's.)"""
    sender, receiver = SenderEngine(tiny, cache_bytes=1 << 24), ReceiverEngine(tiny)
    _push(receiver, sender.prepare(_transcript(1), codec))
    for n in (2, 3):
        parent = _parent(receiver, sender, _transcript(n))
        delta = sender.prepare(_transcript(n), codec, parent=parent)
        header = delta.header
        assert header.parent_card_id == parent.card_id and header.parent_tokens == parent.tokens
        assert {spec.tokens for spec in header.layers} == {header.context_tokens - parent.tokens}
        whole = sender.prepare(_transcript(n), codec)
        stitched = _push(receiver, delta)
        assert stitched.kv.tokens == header.context_tokens
        # lossless: the bytes are the new tokens' alone, and the cache is the whole context's
        if codec.startswith("fp32"):
            per_token = whole.header.payload_bytes / whole.header.context_tokens
            assert header.payload_bytes == per_token * (header.context_tokens - parent.tokens)
            probe = sender.context_ids("Question: how many crates?")[-8:]
            direct = next_logits(tiny, prefill(tiny, sender.context_ids(_transcript(n)))[0], probe)
            assert float((next_logits(tiny, stitched.kv, probe) - direct).abs().max()) < 1e-3
        else:  # each delta's tokens quantized once: the parent's part is exactly the parent's decoded cache
            parent_kv = receiver.card(parent.card_id).kv
            assert all(torch.equal(s[:, : parent.tokens], p[:, : parent.tokens])
                       for s, p in zip(stitched.kv.keys, parent_kv.keys))


def test_a_delta_whose_parent_is_not_held_is_refused_before_its_data_and_nothing_is_kept(tiny):
    sender, receiver = SenderEngine(tiny, cache_bytes=1 << 24), ReceiverEngine(tiny)
    card = sender.prepare(_transcript(2), "int8", parent=Parent("ab" * 32, 3 * BLOCK_TOKENS))
    with pytest.raises(CardError) as e:
        _push(receiver, card)
    assert e.value.kind == ErrorKind.PARENT_MISSING and e.value.details["parent_card_id"] == "ab" * 32
    assert len(receiver.store) == 0 and receiver.admission.intakes == 0 and receiver.admission.bytes == 0
    parent = _push(receiver, sender.prepare(_transcript(1), "int8"))
    other = _push(receiver, sender.prepare(_transcript(1), "int8"), tenant="bob")
    assert other.header.card_id == parent.header.card_id
    card = sender.prepare(_transcript(2), "int8", parent=Parent(parent.header.card_id, 2 * BLOCK_TOKENS))
    with pytest.raises(CardError) as e:  # the parent is another tenant's
        _push(receiver, card, tenant="carol")
    assert e.value.kind == ErrorKind.PARENT_MISSING


@pytest.mark.parametrize("fields, kind", [
    ({"parent_tokens": 0}, ErrorKind.INVALID),  # a parent id without tokens
    ({"parent_card_id": "not-a-card-id"}, ErrorKind.INVALID),
    ({"parent_tokens": 10_000}, ErrorKind.INVALID),  # more than the context
    ({"block_hashes": [b"\x01" * 31]}, ErrorKind.INVALID),
    ({"shared_prefix_tokens": 4}, ErrorKind.INVALID),
])
def test_malformed_delta_headers_are_invalid(tiny, fields, kind):
    sender, receiver = SenderEngine(tiny, cache_bytes=1 << 24), ReceiverEngine(tiny)
    parent = _push(receiver, sender.prepare(_transcript(1), "int8"))
    card = sender.prepare(_transcript(2), "int8", parent=Parent(parent.header.card_id, 2 * BLOCK_TOKENS))
    with pytest.raises(CardError) as e:
        _push(receiver, type(card)(resigned(card, **fields), card.blobs, 0, 0, 0, 0))
    assert e.value.kind == kind


def test_a_delta_extending_more_tokens_than_its_parent_holds_is_invalid(tiny):
    sender, receiver = SenderEngine(tiny, cache_bytes=1 << 24), ReceiverEngine(tiny)
    short = _push(receiver, sender.prepare("Depot 1 holds 107 crates.", "int8"))
    card = sender.prepare(_transcript(2), "int8", parent=Parent(short.header.card_id, short.header.context_tokens + 1))
    with pytest.raises(CardError) as e:
        _push(receiver, card)
    assert e.value.kind == ErrorKind.INVALID and len(receiver.store) == 1


def test_a_kept_delta_decodes_onto_its_parent_and_goes_when_its_parent_does(tiny):
    sender = SenderEngine(tiny, cache_bytes=1 << 24)
    receiver = ReceiverEngine(tiny)
    parent = _push(receiver, sender.prepare(_transcript(1), "kivi-4"))
    delta = _push(receiver, sender.prepare(_transcript(2), "kivi-4", parent=_parent(receiver, sender, _transcript(2))))
    store = receiver.store
    _cool(store)  # nothing stays decoded: the delta is read from its compact form
    again = store.get(delta.header.card_id)
    assert all(torch.equal(a, b) for a, b in zip(again.kv.keys, delta.kv.keys))
    assert store.memory.peek(("", delta.header.card_id)).nbytes < store.memory.peek(("", parent.header.card_id)).nbytes
    store.memory.pop(("", parent.header.card_id))
    _cool(store)
    assert store.get(delta.header.card_id) is None and store.stats.get("memory", "orphan") == 1
    assert ("", delta.header.card_id) not in store.memory


def test_text_handoffs_are_prefixes_too(tiny):
    sender, receiver = SenderEngine(tiny, cache_bytes=1 << 24), ReceiverEngine(tiny)
    text, _ = receiver.accept_text(_transcript(1))
    parent = _parent(receiver, sender, _transcript(2))
    assert parent.card_id == text.header.card_id
    stitched = _push(receiver, sender.prepare(_transcript(2), "fp32", parent=parent))
    full, _ = prefill(tiny, sender.context_ids(_transcript(2)))
    assert max(float((a - b).abs().max()) for a, b in zip(stitched.kv.keys, full.keys)) < 1e-4


def test_cards_that_cannot_be_deltas(tiny):
    from qkv_core.engine.selection import SelectionConfig

    sender = SenderEngine(tiny)
    assert sender.can_extend(sender.codec("kivi-4"), SelectionConfig(), 0)
    assert not sender.can_extend(sender.codec("tokenmix-3"), SelectionConfig(), 0)  # ranks the whole context's tokens
    assert not sender.can_extend(sender.codec("kivi-4"), SelectionConfig(0.5, "prior"), 0)
    assert not sender.can_extend(sender.codec("kivi-4"), SelectionConfig(), 5)  # cross-model
    with pytest.raises(RequestError):
        sender.prepare(_transcript(2), "tokenmix-3", parent=Parent("ab" * 32, 16))


def test_sessions_append_each_call_and_are_per_tenant():
    sessions = Sessions(max_bytes=1 << 10)
    assert sessions.context("", "s1", " First. ") == "First."
    sessions.commit("", "s1", "First.", " First. ")
    assert sessions.context("", "s1", "Second.") == "First.\nSecond."
    sessions.commit("", "s1", "First.\nSecond.", "Second.")
    assert sessions.context("", "s1", "Second.") == "First.\nSecond."  # the last turn again: a retry
    assert sessions.context("", "s1", "") == "First.\nSecond."  # ask again on the same context
    sessions.commit("", "s1", "First.\nSecond.", "")
    assert sessions.context("", "s1", "Third.") == "First.\nSecond.\nThird."
    assert sessions.context("bob", "s1", "Other.") == "Other."
    with pytest.raises(RequestError):
        sessions.context("", "new", "  ")
    with pytest.raises(RequestError):
        sessions.context("", "bad id", "x")
    sessions.commit("", "big", "x" * 2000, "x" * 2000)  # past the budget: the others go first
    assert len(sessions) == 1


def test_chains_of_deltas_are_bounded_and_decode_cold_without_taking_intakes(tiny):
    sender = SenderEngine(tiny, cache_bytes=1 << 26)
    receiver = ReceiverEngine(tiny, limits=Limits(max_intakes=1))  # a cold chain decodes without intakes
    text = _transcript(1)
    cards = [_push(receiver, sender.prepare(text, "int8"))]
    for turn in range(MAX_CHAIN + 1):
        text += f"\nDepot {turn} holds {50 + turn} spare crates."
        cards.append(_push(receiver, sender.prepare(text, "int8", parent=_parent(receiver, sender, text))))
    store = receiver.store
    depths = [store.depth(c.header) for c in cards]
    assert depths[: MAX_CHAIN + 1] == list(range(MAX_CHAIN + 1))
    assert depths[-1] == MAX_CHAIN and cards[-1].header.parent_card_id == cards[-3].header.card_id  # a shallower parent
    _cool(store)
    deepest = cards[MAX_CHAIN].header
    assert torch.equal(store.get(deepest.card_id).kv.keys[0], cards[MAX_CHAIN].kv.keys[0])  # 16 parents decoded again
    deeper = sender.prepare(text + "\nOne more.", "int8", parent=Parent(deepest.card_id, deepest.context_tokens))
    with pytest.raises(CardError) as e:
        _push(receiver, deeper)
    assert e.value.kind == ErrorKind.PRECONDITION and "chain" in str(e.value)
