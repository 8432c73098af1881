"""Hostile input and load against live services: limits, non-finite cards, stalled and cancelled
streams, undecodable bytes; each gets a clear status, nothing leaks, the server keeps serving."""
import threading
import time

import grpc
import pytest
from conftest import ask, gauge, replaced

from qkv_core.card.framing import frames
from qkv_core.config import Limits, StoreConfig
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.sender import SenderEngine
from qkv_core.wire import pb, push_requests

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
CONTEXT = "The vault code is 7731. The vault is in Geneva and opens at noon."


@pytest.fixture(scope="module")
def card(embedded):
    return SenderEngine(embedded).prepare(CONTEXT, "fp16")


def _fails(call, code, match):
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    assert match in err.value.details(), err.value.details()


def test_a_megabyte_context_is_refused_before_prefill_and_the_sender_serves_on(services):
    start = time.perf_counter()
    _fails(lambda: ask(services.sender, "word " * 210_000, "What?", codec="int8", timeout_s=60),
           grpc.StatusCode.RESOURCE_EXHAUSTED, "max_context_tokens")
    assert time.perf_counter() - start < 10  # refused unread, not after a prefill of 200k tokens
    assert "7731" in ask(services.sender, CONTEXT, "What is the vault code?", codec="int8").text


def test_a_card_of_nan_values_with_valid_checksums_is_refused_and_not_stored(receiver_stub, card):
    blobs = [bytearray(b) for b in card.blobs]
    blobs[3][10:12] = b"\x00\x7e"  # fp16 NaN in layer 3's keys; frames() recomputes CRCs and digest
    _fails(lambda: receiver_stub.PushCard(push_requests(frames(card.header, [bytes(b) for b in blobs])), timeout=60),
           grpc.StatusCode.INVALID_ARGUMENT, "non-finite")
    assert not receiver_stub.HasCard(pb.HasCardRequest(card_id=card.header.card_id)).present


def test_headers_that_claim_what_the_data_does_not_hold_are_refused(receiver_stub, card):
    def push_with(**fields):
        header = replaced(card.header, **fields)
        return lambda: receiver_stub.PushCard(push_requests(frames(header, card.blobs)), timeout=60)

    _fails(push_with(context_tokens=10**9), grpc.StatusCode.RESOURCE_EXHAUSTED, "max_context_tokens")
    more = card.header.context_tokens + 1
    _fails(push_with(context_tokens=more), grpc.StatusCode.INVALID_ARGUMENT, "context token ids")
    # a card without its ids or block hashes (older senders) claiming more tokens than its layers hold
    _fails(push_with(context_tokens=more, context_ids=[], block_hashes=[]), grpc.StatusCode.INVALID_ARGUMENT,
           "no layer holds")
    # block hashes the receiver cannot derive (no ids) are not indexed on trust
    _fails(push_with(context_ids=[]), grpc.StatusCode.INVALID_ARGUMENT, "carries the context_ids")
    _fails(push_with(fact_summary="x" * 100_000), grpc.StatusCode.RESOURCE_EXHAUSTED, "max_fact_summary_bytes")
    _fails(push_with(card_id=""), grpc.StatusCode.INVALID_ARGUMENT, "card_id")
    _fails(push_with(card_id="a" * 100_000), grpc.StatusCode.INVALID_ARGUMENT, "card_id")


def test_undecodable_bytes_are_invalid_argument_not_internal(services):
    with grpc.insecure_channel(services.receiver) as channel:
        push = channel.stream_unary("/qkvcomm.v1.ReceiverService/PushCard", request_serializer=None,
                                    response_deserializer=pb.PushCardResponse.FromString)
        _fails(lambda: push(iter([b"\xff\xff\xff\xff\x0f garbage"]), timeout=30),
               grpc.StatusCode.INVALID_ARGUMENT, "undecodable")


def test_generation_limits_name_the_limit(receiver_stub, card):
    receiver_stub.PushCard(push_requests(frames(card.header, card.blobs)), timeout=60)
    limit = Limits().max_new_tokens_limit
    _fails(lambda: list(receiver_stub.Generate(pb.GenerateRequest(card_id=card.header.card_id, query="Code?",
                                                         max_new_tokens=limit + 1), timeout=30)),
           grpc.StatusCode.RESOURCE_EXHAUSTED, "max_new_tokens_limit")
    long_query = pb.GenerateRequest(card_id=card.header.card_id, query="why " * 20_000)
    _fails(lambda: list(receiver_stub.Generate(long_query, timeout=30)),
           grpc.StatusCode.RESOURCE_EXHAUSTED, "max_query_tokens")


def test_a_stream_that_stalls_after_its_header_is_dropped_after_the_idle_timeout(receiver_stub, card):
    header = next(frames(card.header, card.blobs))
    release = threading.Event()

    def stalled():
        yield header
        release.wait(30)

    start = time.perf_counter()
    try:
        _fails(lambda: receiver_stub.PushCard(push_requests(stalled()), timeout=30), grpc.StatusCode.DEADLINE_EXCEEDED,
               "idle_timeout_s")
    finally:
        release.set()
    assert 2.5 < time.perf_counter() - start < 15  # the services under test use a 3 s idle timeout


def test_streams_held_open_stay_within_the_admission_and_are_released_when_cancelled(services, receiver_stub, card):
    header = next(frames(card.header, card.blobs))
    release = threading.Event()

    def held():
        yield header
        release.wait(60)

    port, limit = services.receiver_metrics, Limits().max_intakes
    deadline = time.time() + 20  # the session's services are shared: let earlier tests' streams end first
    while gauge(port, "qkvcomm_intakes_in_flight") and time.time() < deadline:
        time.sleep(0.05)
    calls = [receiver_stub.PushCard.future(push_requests(held()), timeout=60) for _ in range(limit)]
    try:
        deadline = time.time() + 20
        while gauge(port, "qkvcomm_intakes_in_flight") < limit and time.time() < deadline:
            time.sleep(0.05)
        assert gauge(port, "qkvcomm_intakes_in_flight") == limit
        per_card = 2 * 30 * 3 * 64 * 4 * card.header.context_tokens  # fp32 K and V, every layer
        assert gauge(port, "qkvcomm_intake_bytes_in_flight") == limit * per_card
        _fails(lambda: receiver_stub.PushCard(push_requests(frames(card.header, card.blobs)), timeout=30),
               grpc.StatusCode.RESOURCE_EXHAUSTED, "max_intakes")
    finally:
        for call in calls:
            call.cancel()
        release.set()
    deadline = time.time() + 20
    while gauge(port, "qkvcomm_intakes_in_flight") and time.time() < deadline:
        time.sleep(0.05)
    assert gauge(port, "qkvcomm_intakes_in_flight") == 0 and gauge(port, "qkvcomm_intake_bytes_in_flight") == 0
    # serves on
    assert receiver_stub.PushCard(push_requests(frames(card.header, card.blobs)),
                                  timeout=60).card_id == card.header.card_id


def test_a_card_larger_than_the_store_is_refused_before_its_data(embedded, card):
    from qkv_core.errors import LimitExceeded

    small = ReceiverEngine(embedded, StoreConfig(hot_bytes=1 << 10))
    stream = frames(card.header, card.blobs)
    with pytest.raises(LimitExceeded, match="hot_bytes"):
        small.accept(stream)
    assert len(small.store) == 0 and small.admission.intakes == 0 and small.admission.bytes == 0


def test_a_cancelled_prefill_stops_at_its_next_chunk_and_encodes_nothing(embedded):
    """What the sender does when its client goes away (deadline, disconnect): the prefill of a long
    context stops between chunks instead of running to the end."""
    import threading

    from conftest import qa_rows

    from qkv_core.errors import Cancelled

    long = "\n\n".join(r["context"] for r in qa_rows("squad.jsonl", 240)[:40])  # ~6,000 tokens: several chunks
    cancel, outcome = threading.Event(), {}

    def prepare():
        try:
            outcome["card"] = SenderEngine(embedded).prepare(long, "int8", cancel=cancel)
        except Cancelled as e:
            outcome["cancelled"] = str(e)

    worker = threading.Thread(target=prepare)
    worker.start()
    time.sleep(1.0)
    cancel.set()
    worker.join(120)
    assert not worker.is_alive() and "card" not in outcome
    done, total = (int(n) for n in outcome["cancelled"].split("after ")[1].split(" tokens")[0].split(" of "))
    assert 0 < done < total  # it stopped partway, at a chunk boundary
