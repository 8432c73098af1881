"""The light Python client (clients/python, qkvcomm-client): errors, retries and channel reuse
against small fake servers; then, installed alone in a fresh virtualenv (no torch there), a
handoff against the live services whose answers equal the in-process client's on real rows."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import venv
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from conftest import ask, qa_rows
from qkvcomm.v1 import services_pb2 as pb
from qkvcomm.v1 import services_pb2_grpc
from qkvcomm_client import AsyncReceiverClient, QKVCommError, ReceiverClient

from service_common.status import error_metadata

ROOT = Path(__file__).resolve().parents[1]


class FlakyReceiver(services_pb2_grpc.InfoServiceServicer, services_pb2_grpc.ReceiverServiceServicer):
    """Info fails UNAVAILABLE `fail` times, then answers; HasCard refuses a bad id with an ErrorInfo;
    every call notes the client's address (one per connection)."""

    def __init__(self, fail: int):
        self.fail, self.calls, self.peers = fail, 0, set()

    def Info(self, request, context):
        self.calls += 1
        self.peers.add(context.peer())
        if self.calls <= self.fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return pb.InfoResponse(role="receiver", version="test")

    def HasCard(self, request, context):
        self.peers.add(context.peer())
        if len(request.card_id) != 64:
            context.set_trailing_metadata(error_metadata(grpc.StatusCode.INVALID_ARGUMENT, "bad id", "invalid",
                                                         {"card_id_length": str(len(request.card_id))}))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "card_id must be 64 hex digits")
        return pb.HasCardResponse(present=True, context_tokens=7)


def _serve(servicer: FlakyReceiver) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    services_pb2_grpc.add_InfoServiceServicer_to_server(servicer, server)
    services_pb2_grpc.add_ReceiverServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def flaky() -> Iterator[tuple[FlakyReceiver, str]]:
    servicer = FlakyReceiver(fail=2)
    server, address = _serve(servicer)
    yield servicer, address
    server.stop(0)


def test_idempotent_calls_are_retried_on_unavailable(flaky):
    servicer, address = flaky
    with ReceiverClient(address, retries=2) as client:
        assert client.info().version == "test" and servicer.calls == 3
    servicer.calls = 0
    with ReceiverClient(address, retries=0) as client, pytest.raises(QKVCommError) as err:
        client.info()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and servicer.calls == 1


def test_refusals_carry_their_error_info_and_calls_share_one_channel(flaky):
    servicer, address = flaky
    with ReceiverClient(address) as client:
        assert client.has_card("a" * 64).context_tokens == 7
        with pytest.raises(QKVCommError) as err:
            client.has_card("abc")
        assert client.has_card("b" * 64).present
    e = err.value
    assert isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (e.reason, e.domain, e.metadata) == ("INVALID", "qkvcomm.v1", {"card_id_length": "3"})
    assert "INVALID_ARGUMENT INVALID" in str(e) and "64 hex digits" in e.details()
    assert len(servicer.peers) == 1  # one connection for the client's three calls


def test_the_async_client_decodes_the_same_refusal(flaky):
    _, address = flaky

    async def run() -> QKVCommError:
        async with AsyncReceiverClient(address) as client:
            assert (await client.has_card("c" * 64)).present
            with pytest.raises(QKVCommError) as err:
                await client.has_card("xyz")
            return err.value

    e = asyncio.run(run())
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.metadata == {"card_id_length": "3"}


# Runs inside the fresh venv: only qkvcomm-client (and grpcio, protobuf) are installed there.
SCRIPT = r"""
import asyncio, importlib.util, json, sys
from qkvcomm_client import AsyncSenderClient, QKVCommError, ReceiverClient, SenderClient

sender_address, receiver_address, rows = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {"torch": importlib.util.find_spec("torch") is not None, "answers": []}
with SenderClient(sender_address) as sender:
    out["model"] = sender.info().model.name
    for row in rows:
        pieces = []
        answer = sender.ask(row["context"], row["question"], codec="fp16", on_text=pieces.append)
        out["answers"].append({"text": answer.text, "streamed": "".join(pieces), **answer.to_dict()})
    stats = sender.share(rows[0]["context"], codec="int8")
    try:
        sender.ask(rows[0]["context"], rows[0]["question"], codec="int4")
    except QKVCommError as e:
        out["refused"] = [e.code().name, e.reason]
with ReceiverClient(receiver_address) as receiver:
    out["held"] = receiver.has_card(stats.card_id).present
    out["generated"] = receiver.generate(stats.card_id, rows[0]["question"]).text

async def main():
    async with AsyncSenderClient(sender_address) as sender:
        stream = sender.ask_stream(rows[1]["context"], rows[1]["question"], codec="fp16")
        return "".join([piece async for piece in stream]), stream.stats.codec

out["async"] = asyncio.run(main())
print(json.dumps(out))
"""


@pytest.mark.integration
@pytest.mark.e2e
def test_the_client_installed_alone_hands_off_against_live_services(services, embedded, tmp_path):
    wheels, env_dir = tmp_path / "wheels", tmp_path / "venv"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(wheels),
             str(ROOT / "clients/python")]
    subprocess.run(build, check=True, timeout=600)
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    wheel = next(wheels.glob("qkvcomm_client-*.whl"))
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), str(wheel)],
                   check=True, timeout=600)
    rows = qa_rows("squad.jsonl", 9)[6:]  # rows the 135M model answers (most SQuAD rows it does not)
    done = subprocess.run([str(python), "-c", SCRIPT, services.sender, services.receiver, json.dumps(rows)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert not out["torch"] and out["model"] == embedded.fingerprint.name
    for row, got in zip(rows, out["answers"]):
        expected = ask(services.sender, row["context"], row["question"], codec="fp16")
        assert got["text"] == got["streamed"] == expected.text and got["codec"] == "fp16"
        assert got["context_tokens"] == expected.stats.context_tokens and isinstance(got["wire_bytes"], int)
    right = [any(g.lower() in a["text"].lower() for g in row["answers"]) for row, a in zip(rows, out["answers"])]
    assert sum(right) >= 2, right
    assert out["refused"] == ["INVALID_ARGUMENT", "INVALID"]
    assert out["held"] and out["generated"].strip()
    assert out["async"] == [ask(services.sender, rows[1]["context"], rows[1]["question"], codec="fp16").text, "fp16"]
