"""A refusal as gRPC sends it: the status code, the message, and a google.rpc.Status in the
trailing metadata (grpc-status-details-bin) whose one detail is a google.rpc.ErrorInfo:

    reason    UPPER_SNAKE, one per kind of refusal (docs/protocol.md): INVALID, LIMIT, ...
    domain    "qkvcomm.v1"
    metadata  machine-readable facts, e.g. sender_model / receiver_model, limit / allowed
Clients read it with qkvcomm_client.error_info (Python; the sender reads its receiver's refusals
the same way) or by decoding that header (Node).
"""
from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "qkvcomm.v1"


def error_metadata(code: grpc.StatusCode, message: str, reason: str, details: dict[str, str] | None = None,
                   ) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that carries the ErrorInfo of a refusal."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason.upper(), domain=DOMAIN, metadata=details or {}))
    status = status_pb2.Status(code=code.value[0], message=message, details=[info])
    return tuple(rpc_status.to_status(status).trailing_metadata)

