"""Dialogues through the live services with the embedded model on real SQuAD rows: sessions, delta
cards that ship only each turn's tokens, shared prefixes without a session, and the fallbacks."""
from __future__ import annotations

import re

import grpc
import pytest
from conftest import ask, gauge, qa_rows
from qkvcomm_client import SenderClient, error_info

from qkv_core.card.blocks import BLOCK_TOKENS
from qkv_core.card.framing import frames
from qkv_core.engine.answering import Generation
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.sender import Parent, SenderEngine
from qkv_core.model.kv import next_logits
from qkv_core.model.prompt import encode
from qkv_core.wire import pb, push_requests

# Rows no other test of the shared services hands on, and each test its own: a context one test sent
# would be a held prefix for another's.
ROWS = qa_rows("squad.jsonl", 240)[7::24][:6]


def _turns(context: str, parts: int = 3) -> list[str]:
    """A context as `parts` turns of whole sentences."""
    sentences = re.split(r"(?<=[.!?])\s+", context.strip())
    size, extra = divmod(len(sentences), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [" ".join(sentences[a:b]) for a, b in zip(bounds, bounds[1:])]


def _full_card_answer(lm, context: str, question: str, codec: str) -> str:
    """The answer on one whole card of `context`, through engines of this process."""
    card = SenderEngine(lm).prepare(context, codec)
    receiver = ReceiverEngine(lm)
    receiver.accept(frames(card.header, card.blobs))
    return "".join(receiver.generate(card.header.card_id, question, 24, False, Generation(card.header.card_id)))


def test_a_three_turn_dialogue_ships_only_each_turns_tokens_and_answers_as_one_card(services, embedded):
    for i, row in enumerate(ROWS[:3]):
        turns = _turns(row["context"])
        assert len(turns) == 3
        session = f"dialogue-{i}"
        with SenderClient(services.sender) as client:
            first = client.share(turns[0], codec="fp16", session=session)
            second = client.share(turns[1], codec="fp16", session=session)
            answer = client.ask(turns[2], row["question"], codec="fp16", session=session)
        third = answer.stats
        assert not first.delta and first.reused_tokens == 0
        per_token = first.wire_bytes / first.context_tokens
        for before, turn in ((first, second), (second, third)):
            # the longest held prefix: the last turn's card, or, when that turn ended inside the block it
            # began (no whole block of its own to find it by), the card before it
            assert turn.delta and turn.parent_card_id in (before.card_id, before.parent_card_id)
            assert 0 <= before.context_tokens - turn.reused_tokens < 2 * BLOCK_TOKENS
            sent = turn.context_tokens - turn.reused_tokens
            assert abs(turn.wire_bytes / sent - per_token) < 0.05 * per_token  # fp16: the bytes of the new tokens
        assert answer.text.strip() == _full_card_answer(embedded, "\n".join(turns), row["question"], "fp16").strip()


def test_stitched_deltas_give_the_logits_of_one_whole_card(embedded):
    """fp32: parent and deltas, stitched at the receiver, against one card of the whole transcript."""
    row = ROWS[0]
    turns = _turns(row["context"])
    sender, receiver = SenderEngine(embedded, cache_bytes=1 << 30), ReceiverEngine(embedded)
    card = None
    for n in range(1, 4):
        context = "\n".join(turns[:n])
        parent = None
        if card is not None:
            held = card.header.context_tokens
            parent = Parent(card.header.card_id, held)
        prepared = sender.prepare(context, "fp32", parent=parent)
        card = receiver.accept(frames(prepared.header, prepared.blobs))
    whole = SenderEngine(embedded).prepare("\n".join(turns), "fp32")
    one = ReceiverEngine(embedded).accept(frames(whole.header, whole.blobs))
    query = encode(embedded.tokenizer, receiver.prompt.query_part(row["question"]))
    assert card.kv.tokens == one.kv.tokens
    assert float((next_logits(embedded, card.kv, query) - next_logits(embedded, one.kv, query)).abs().max()) < 1e-3


def test_contexts_that_share_a_document_share_its_tokens_without_a_session(services):
    row = ROWS[3]
    first = ask(services.sender, row["context"] + "\nFirst reader's note.", row["question"], codec="int8").stats
    again = ask(services.sender, row["context"] + "\nSecond reader's note.", row["question"], codec="int8").stats
    assert not first.delta and again.delta and again.parent_card_id == first.card_id
    assert again.reused_tokens >= first.context_tokens - 2 * BLOCK_TOKENS
    assert again.wire_bytes < first.wire_bytes / 4
    same = ask(services.sender, row["context"] + "\nSecond reader's note.", "Who wrote it?", codec="int8").stats
    assert same.card_reused and same.wire_bytes == 0 and same.card_id == again.card_id


def test_a_delta_whose_parent_is_gone_is_sent_whole(services, monkeypatch):
    """The receiver found a prefix, then lost it before the delta arrived: the sender sends the whole card."""
    row = ROWS[4]
    held = ask(services.sender, row["context"], row["question"], codec="int8").stats
    monkeypatch.setattr(ReceiverEngine, "find_prefix", lambda self, hashes, tenant="",
                        codecs=(): ("ab" * 32, held.context_tokens - 1))
    refused = gauge(services.receiver_metrics, "qkvcomm_errors_total", reason="parent_missing")
    answer = ask(services.sender, row["context"] + "\nA later note.", row["question"], codec="int8")
    s = answer.stats
    assert not s.delta and s.reused_tokens == 0 and s.wire_bytes > held.wire_bytes
    assert gauge(services.receiver_metrics, "qkvcomm_errors_total", reason="parent_missing") == refused + 1
    assert answer.text.strip()


def test_a_forged_parent_is_refused_with_its_reason_and_nothing_is_kept(receiver_stub, embedded):
    card = SenderEngine(embedded).prepare(ROWS[0]["context"], "int8", parent=Parent("cd" * 32, 3 * BLOCK_TOKENS))
    with pytest.raises(grpc.RpcError) as e:
        receiver_stub.PushCard(push_requests(frames(card.header, card.blobs)), timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(e.value)
    assert info.reason == "PARENT_MISSING" and info.metadata["parent_card_id"] == "cd" * 32
    assert not receiver_stub.HasCard(pb.HasCardRequest(card_id=card.header.card_id), timeout=10).present


def test_a_session_can_ask_again_on_its_context_and_refuses_an_unknown_one(services):
    row = ROWS[5]
    with SenderClient(services.sender) as client:
        first = client.ask(row["context"], row["question"], codec="int8", session="again-1").stats
        again = client.ask("", "What is this about?", codec="int8", session="again-1").stats
        assert again.card_reused and again.card_id == first.card_id and again.wire_bytes == 0
        with pytest.raises(grpc.RpcError) as e:
            client.ask("", row["question"], session="never-opened")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_session_keeps_its_codec_and_finds_its_cards_after_a_turn_in_another(services):
    """kivi-4 named on the first turn only: turns 2 and 3 stay kivi-4 deltas. A turn in int8 is
    a whole card; a later kivi-4 turn is a delta on the kivi-4 card again."""
    row = qa_rows("squad.jsonl", 240)[160]
    with SenderClient(services.sender) as client:
        first = client.share(row["context"], codec="kivi-4", session="keeps-1")
        turns = [client.share(f"Note {i}: the record above is from the archive.", session="keeps-1") for i in (2, 3)]
        assert first.codec == "kivi-4" and not first.delta
        assert all(t.codec == "kivi-4" and t.delta and 0 < t.wire_bytes < first.wire_bytes for t in turns)
        switched = client.share("Note 4: checked again.", codec="int8", session="keeps-1")
        back = client.share("Note 5: and once more.", codec="kivi-4", session="keeps-1")
    assert switched.codec == "int8" and not switched.delta
    assert back.codec == "kivi-4" and back.delta and back.wire_bytes < first.wire_bytes


@pytest.mark.parametrize("codec", ["budget-3", "budget-2"])
def test_a_short_follow_up_on_a_held_card_succeeds_with_budget_codecs(services, embedded, codec):
    """A few tokens past a held fp16 card (any codec's delta may extend a lossless parent): a delta
    that small cannot meet a budget on its own, so the sender sends the whole card rather than fail
    the request it chose to make a delta."""
    words = qa_rows("squad.jsonl", 240)[{"budget-3": 190, "budget-2": 230}[codec]]["context"].split()
    sender = SenderEngine(embedded)

    def common(text: str) -> int:  # tokens a note after `text` leaves alone (the prompt's tail follows the context)
        a, b = sender.context_ids(text), sender.context_ids(text + " Yes.")
        return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)

    while common(" ".join(words)) % BLOCK_TOKENS:  # whole blocks held: the delta is about the note alone
        words.pop()
    context = " ".join(words)
    whole = 0
    with SenderClient(services.sender) as client:
        held = client.share(context, codec="fp16")
        for note in (" Yes.", " Checked.", " See the note below for details."):  # 1-15 tokens more
            answer = client.ask(context + note, "What is this about?", codec=codec, max_new_tokens=8)
            s = answer.stats
            assert s.codec == codec and s.wire_bytes > 0 and answer.text.strip()
            assert 0 < s.context_tokens - held.context_tokens <= 15
            whole += not s.delta
    assert whole >= 1  # at least one note was too short for a budget delta: sent whole, not refused
