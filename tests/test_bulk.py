"""The receiver's bulk channel (receiver_service/bulk.py), on the live pair (whose receiver offers it):
handoffs send their card data there; a bulk peer that sends other bytes, too few, nothing, or an
unknown or spent ticket gets a clear status, nothing is kept, and the channel keeps working."""
import os
import socket
import time

import grpc
import pytest
from conftest import ask, gauge

from qkv_core.card.naming import name_card
from qkv_core.engine.sender import SenderEngine
from qkv_core.wire import pb

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
CONTEXT = ("The observatory on the ridge opened in 1931. Its refractor has a 60 cm lens, and guided tours "
           "run on Fridays at 21:00 from April to September.")


@pytest.fixture(scope="module")
def card(embedded):
    """A card of the live pair's model, made here, never sent by the sender."""
    prepared = SenderEngine(embedded).prepare(CONTEXT + " Tickets cost 7 euros.", "int8")
    return prepared.header, prepared.blobs


def _ticket(receiver_stub, header):
    call = receiver_stub.PushCardBulk(pb.PushCardBulkRequest(header=header), timeout=60)
    return call, next(call).ticket


def _held(receiver_stub, card_id: str) -> bool:
    return receiver_stub.HasCard(pb.HasCardRequest(card_id=card_id), timeout=10).present


def _refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        list(call)
    return refused.value.code()


def test_handoffs_send_their_card_data_on_the_bulk_channel(services, embedded):
    def calls(method: str) -> float:
        return gauge(services.receiver_metrics, "qkvcomm_requests_total", method=method,
                     model_name=embedded.fingerprint.name, status="OK")

    before, frames_before = calls("PushCardBulk"), calls("PushCard")
    answer = ask(services.sender, CONTEXT, "When do the tours run?", codec="kivi-4")
    assert "Friday" in answer.text and answer.stats.wire_bytes > 0 and not answer.stats.card_reused
    assert calls("PushCardBulk") == before + 1 and calls("PushCard") == frames_before


def test_the_bulk_channel_takes_a_card_whole_and_its_ticket_once(services, receiver_stub, card):
    header, blobs = card
    call, ticket = _ticket(receiver_stub, header)
    assert len(ticket.token) == 32 and ticket.port and not ticket.tls
    with socket.create_connection(("127.0.0.1", ticket.port)) as conn:
        conn.sendall(ticket.token)
        for blob in blobs:
            conn.sendall(blob)
    done = list(call)[-1].done
    assert done.card_id == header.card_id
    assert done.wire_bytes == pb.CardFrame(header=header).ByteSize() + sum(map(len, blobs))
    assert _held(receiver_stub, header.card_id)
    with socket.create_connection(("127.0.0.1", ticket.port)) as conn:  # the ticket is spent
        conn.sendall(ticket.token)
        conn.settimeout(10)
        assert conn.recv(1) == b""  # closed unread


def _damaged(blobs: list[bytes]) -> list[bytes]:
    """The same lengths, one bit of the last layer's codes flipped: it decodes, but is not the card."""
    last = bytearray(blobs[-1])
    last[len(last) // 3] ^= 1
    return [*blobs[:-1], bytes(last)]


@pytest.mark.parametrize("fault", ["other bytes", "too few", "stall", "unknown token"])
def test_a_bad_bulk_peer_gets_a_clear_status_and_nothing_is_kept(services, receiver_stub, card, fault):
    header, blobs = card
    header = pb.CardHeader.FromString(header.SerializeToString())
    header.fact_summary = fault  # another card (another id) per case, so none is held from an earlier one
    name_card(header, blobs)
    if fault == "other bytes":
        blobs = _damaged(blobs)
    call, ticket = _ticket(receiver_stub, header)
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", ticket.port)) as conn:
        conn.sendall(os.urandom(32) if fault == "unknown token" else ticket.token)
        if fault == "other bytes":
            for blob in blobs:
                conn.sendall(blob)
        elif fault in ("too few", "stall"):
            conn.sendall(blobs[0][: len(blobs[0]) // 2])
        if fault == "stall":  # hold the connection open, silent, past the receiver's idle timeout (3 s)
            code = _refused(call)
        else:
            conn.shutdown(socket.SHUT_WR)
            code = _refused(call)
    expected = {"other bytes": grpc.StatusCode.DATA_LOSS, "too few": grpc.StatusCode.DATA_LOSS,
                "stall": grpc.StatusCode.DEADLINE_EXCEEDED, "unknown token": grpc.StatusCode.DEADLINE_EXCEEDED}
    assert code == expected[fault]
    assert time.perf_counter() - started < 30
    assert not _held(receiver_stub, header.card_id)
    assert gauge(services.receiver_metrics, "qkvcomm_intakes_in_flight") == 0
    assert "Friday" in ask(services.sender, CONTEXT, "When do the tours run?", codec="int8").text  # still works
