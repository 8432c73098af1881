"""The services' log lines: the access log's structured fields, the JSON format, the periodic stats line."""
import asyncio
import json
import logging
import time

import grpc
from prometheus_client import CollectorRegistry, Counter
from qkvcomm.v1 import services_pb2_grpc

from qkv_core.wire import pb
from service_common import logs


def test_each_call_logs_a_line_whose_fields_say_what_happened(services, caplog):
    caplog.set_level(logging.INFO, logger="qkvcomm.access")
    with grpc.insecure_channel(services.receiver) as channel:
        stub = services_pb2_grpc.ReceiverServiceStub(channel)
        stub.HasCard(pb.HasCardRequest(card_id="0" * 64), timeout=10)
        try:
            stub.HasCard(pb.HasCardRequest(card_id="not-an-id"), timeout=10)
        except grpc.RpcError:
            pass

    def lines() -> list[dict]:
        return [r.fields for r in caplog.records if r.name == "qkvcomm.access" and r.fields["method"] == "HasCard"]

    deadline = time.monotonic() + 10
    while len(lines()) < 2 and time.monotonic() < deadline:  # a line is written as its call ends, after the reply
        time.sleep(0.05)
    ok, refused = lines()[-2:]
    assert ok["status"] == "OK" and ok["service"] == "receiver" and ok["ms"] >= 0 and "reason" not in ok
    assert refused["status"] == "INVALID_ARGUMENT" and refused["reason"] == "invalid" and "hex" in refused["error"]
    line = json.loads(logs.JsonFormatter().format(next(r for r in caplog.records if r.fields is refused)))
    assert line["logger"] == "qkvcomm.access" and line["status"] == "INVALID_ARGUMENT" and line["tenant"] == "-"


def test_the_stats_line_says_what_changed_and_nothing_when_idle(caplog):
    caplog.set_level(logging.INFO, logger="qkvcomm.stats")
    registry = CollectorRegistry()
    calls = Counter("qkvcomm_requests_total", "calls", ["status"], registry=registry)
    received = Counter("qkvcomm_wire_bytes_received_total", "bytes", registry=registry)
    refused = Counter("qkvcomm_errors_total", "refused", ["reason"], registry=registry)

    async def run() -> None:
        task = asyncio.create_task(logs.stats_lines("receiver", registry, 0.2))
        await asyncio.sleep(0.1)
        calls.labels("OK").inc(3)
        refused.labels("invalid").inc()
        received.inc(5e6)
        await asyncio.sleep(0.6)  # one interval with the calls, then idle ones
        task.cancel()

    asyncio.run(run())
    lines = [r for r in caplog.records if r.name == "qkvcomm.stats"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].fields | {"seconds": 0} == {"service": "receiver", "seconds": 0, "calls": 3, "refused": 1,
                                               "cards": 0, "wire_bytes": 5_000_000}
    assert "3 calls" in lines[0].getMessage() and "5.0 MB" in lines[0].getMessage()
