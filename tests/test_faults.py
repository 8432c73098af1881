"""Faults with the services as real processes: a receiver killed mid-push and restarted, a sender
killed mid-push, SIGTERM during a generation."""
import signal
import threading
import time

import grpc
import pytest
from conftest import ask, gauge, qa_rows
from qkvcomm.v1 import services_pb2_grpc

from qkv_core.wire import pb
from qkvcomm_cli.launch import spawn

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
SHORT = ("The museum opens at 9:30 and closes at 17:00. Entry costs 12 euros.", "How much does entry cost?", "12")


def _long_context() -> str:
    return "\n\n".join(r["context"] for r in qa_rows("squad.jsonl", 240)[::24][:9])  # ~1,500 tokens


def _wait_for(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def _ask_in_background(sender: str) -> dict:
    """An fp32 Ask of a long context (a ~70 MB card) in a thread; the result lands in the dict."""
    outcome: dict = {}

    def run():
        try:
            outcome["answer"] = ask(sender, _long_context(), "What is the first paragraph about?", codec="fp32",
                                    timeout_s=120)
        except grpc.RpcError as e:
            outcome["error"] = e.code()

    outcome["thread"] = threading.Thread(target=run)
    outcome["thread"].start()
    return outcome


# the card's data in PushCard's frames, or on the receiver's bulk channel (the sender uses it when offered)
CHANNELS = pytest.mark.parametrize("channel", [(), ("--bulk-port", "-1")], ids=["frames", "bulk"])


@CHANNELS
def test_receiver_killed_mid_push_then_restarted_and_the_next_ask_succeeds(channel):
    receiver = spawn("receiver", *channel)
    sender = spawn("sender", "--receiver", receiver.address)
    try:
        assert SHORT[2] in ask(sender.address, *SHORT[:2], codec="int8").text
        pushing = _ask_in_background(sender.address)
        assert _wait_for(lambda: gauge(receiver.metrics_port, "qkvcomm_intakes_in_flight") >= 1)
        receiver.process.send_signal(signal.SIGKILL)
        receiver.process.wait()
        pushing["thread"].join(60)
        assert pushing.get("error") == grpc.StatusCode.UNAVAILABLE, pushing
        receiver = spawn("receiver", *channel, port=receiver.port)  # same address; the sender is not restarted
        answer = ask(sender.address, *SHORT[:2], codec="int8")
        assert SHORT[2] in answer.text and not answer.stats.card_reused  # the new receiver holds nothing
    finally:
        sender.stop()
        receiver.stop()


@CHANNELS
def test_sender_killed_mid_push_frees_the_receivers_intake(channel):
    receiver = spawn("receiver", *channel)
    sender = spawn("sender", "--receiver", receiver.address)
    try:
        pushing = _ask_in_background(sender.address)
        port = receiver.metrics_port
        assert _wait_for(lambda: gauge(port, "qkvcomm_intakes_in_flight") >= 1)
        assert gauge(port, "qkvcomm_intake_bytes_in_flight") > 0
        sender.process.send_signal(signal.SIGKILL)
        sender.process.wait()
        pushing["thread"].join(60)
        assert _wait_for(lambda: gauge(port, "qkvcomm_intakes_in_flight") == 0, 30)
        assert gauge(port, "qkvcomm_intake_bytes_in_flight") == 0
        with grpc.insecure_channel(receiver.address) as channel:  # and it still takes cards
            stub = services_pb2_grpc.ReceiverServiceStub(channel)
            assert not stub.HasCard(pb.HasCardRequest(card_id="0" * 64)).present
    finally:
        sender.stop()
        receiver.stop()


def test_sigterm_during_a_long_generation_ends_the_receiver_within_its_grace():
    grace_s = 2.0
    receiver = spawn("receiver", env={"QKVCOMM_GRACE_S": str(grace_s)})
    try:
        with grpc.insecure_channel(receiver.address) as channel:
            stub = services_pb2_grpc.ReceiverServiceStub(channel)
            card = stub.PushText(pb.PushTextRequest(context=SHORT[0]), timeout=60)
            stream = stub.Generate(pb.GenerateRequest(card_id=card.card_id, query="Tell me a very long story.",
                                                      max_new_tokens=1000), timeout=120)
            next(stream)  # generating
            start = time.perf_counter()
            receiver.process.send_signal(signal.SIGTERM)
            code = receiver.process.wait(30)
            took = time.perf_counter() - start
            with pytest.raises(grpc.RpcError):
                for _ in stream:  # the call in flight ends with a status (cut at the grace), not a hang
                    pass
        assert code == 0 and took < grace_s + 3, (code, took)
    finally:
        receiver.stop()


def test_sigterm_during_a_long_prefill_ends_the_sender_within_its_grace():
    """A prefill cannot be interrupted; the process still ends within its grace, not after it."""
    grace_s = 2.0
    receiver = spawn("receiver")
    sender = spawn("sender", "--receiver", receiver.address, env={"QKVCOMM_GRACE_S": str(grace_s)})
    try:
        # ~9,000 tokens: a prefill of many seconds
        long = "\n\n".join(r["context"] for r in qa_rows("squad.jsonl", 240)[:60])
        outcome: dict = {}

        def run():
            try:
                ask(sender.address, long, "What is this about?", codec="int8", timeout_s=300)
            except grpc.RpcError as e:
                outcome["error"] = e.code()

        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(3)  # inside the prefill
        start = time.perf_counter()
        sender.process.send_signal(signal.SIGTERM)
        code = sender.process.wait(60)
        took = time.perf_counter() - start
        thread.join(30)
        assert code == 0 and took < grace_s + 3, (code, took)
        assert outcome.get("error") in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), outcome
    finally:
        sender.stop()
        receiver.stop()
