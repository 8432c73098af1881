"""A Python client of the SenderService."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.json_format import MessageToDict
from qkvcomm.v1 import services_pb2_grpc

from qkv_core.wire import pb
from service_common.auth import call_metadata
from service_common.server import GRPC_OPTIONS
from service_common.tls import ClientTLS, open_channel


@dataclass
class Answer:
    text: str
    stats: pb.HandoffStats

    def to_json(self) -> str:
        stats = MessageToDict(self.stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        for key in ("wire_bytes", "kv_fp16_bytes", "kv_fp32_bytes"):  # proto3 JSON spells uint64 as strings
            stats[key] = int(stats[key])
        return json.dumps({"answer": self.text.strip(), **stats})


def ask(
    sender: str,
    context: str,
    question: str,
    codec: str = "",
    facts: bool = False,
    max_new_tokens: int = 0,
    on_text: Callable[[str], None] | None = None,
    timeout_s: float = 600.0,
    layer_ratio: float = 0.0,
    layer_method: str = "",
    tls: ClientTLS = ClientTLS(),
    token: str = "",
    tenant: str = "",
) -> Answer:
    """Call SenderService.Ask; `on_text` sees each piece of the answer as it streams in. `tls`: how to
    reach a TLS sender; `token`: its bearer token; `tenant`: for a token that may name one."""
    request = pb.AskRequest(
        context=context, question=question, codec=codec, facts=facts, max_new_tokens=max_new_tokens,
        layer_ratio=layer_ratio, layer_method=layer_method
    )
    text, stats = [], pb.HandoffStats()
    with open_channel(sender, tls, GRPC_OPTIONS) as channel:
        replies = services_pb2_grpc.SenderServiceStub(channel).Ask(request, timeout=timeout_s, metadata=call_metadata(token, tenant))
        for reply in replies:
            if reply.HasField("stats"):
                stats = reply.stats
            else:
                text.append(reply.text)
                if on_text:
                    on_text(reply.text)
    return Answer("".join(text), stats)


def healthy(address: str, service: str = "", timeout_s: float = 3.0, tls: ClientTLS = ClientTLS()) -> bool:
    """True when the server at `address` answers grpc.health.v1 with SERVING (no token needed)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

    with open_channel(address, tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
