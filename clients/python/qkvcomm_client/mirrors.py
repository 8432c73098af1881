"""Wire-compatible mirrors of the few foreign messages the client reads or sends.

google.rpc.Status and google.rpc.ErrorInfo (a refusal's details, trailing metadata
`grpc-status-details-bin`) and grpc.health.v1's HealthCheckRequest/Response are defined here,
field for field, in a private descriptor pool. The client thereby needs only grpcio and protobuf
(not googleapis-common-protos, grpcio-status or grpcio-health-checking), and a process that
also loads the official definitions sees no name clash. Protobuf's wire format carries field
numbers and types, not names, so these parse and emit the same bytes as the originals:

    Status           code int32 = 1, message string = 2, details repeated Any = 3
    Any              type_url string = 1, value bytes = 2
    ErrorInfo        reason string = 1, domain string = 2, metadata map<string, string> = 3
    HealthCheckRequest   service string = 1
    HealthCheckResponse  status enum = 1 (1: SERVING)
"""
from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "qkvcomm_client.mirrors"
_STRING, _BYTES, _INT32, _MESSAGE = _F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_INT32, _F.TYPE_MESSAGE


def _add(owner, name: str, *fields: tuple) -> descriptor_pb2.DescriptorProto:
    """A message `name` in `owner` (a file or a message) with fields (name, number, type[, type_name, repeated])."""
    message = owner.message_type.add(name=name) if hasattr(owner, "message_type") else owner.nested_type.add(name=name)
    for field_name, number, kind, *rest in fields:
        type_name, repeated = (rest + ["", False])[:2]
        field = message.field.add(name=field_name, number=number, type=kind,
                                  label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
        if type_name:  # only message fields name a type (an empty one set counts as set)
            field.type_name = type_name
    return message


def _pool() -> descriptor_pool.DescriptorPool:
    file = descriptor_pb2.FileDescriptorProto(name="qkvcomm_client/mirrors.proto", package=_PACKAGE, syntax="proto3")
    _add(file, "Any", ("type_url", 1, _STRING), ("value", 2, _BYTES))
    _add(file, "Status", ("code", 1, _INT32), ("message", 2, _STRING),
         ("details", 3, _MESSAGE, f".{_PACKAGE}.Any", True))
    info = _add(file, "ErrorInfo", ("reason", 1, _STRING), ("domain", 2, _STRING),
                ("metadata", 3, _MESSAGE, f".{_PACKAGE}.ErrorInfo.MetadataEntry", True))
    _add(info, "MetadataEntry", ("key", 1, _STRING), ("value", 2, _STRING)).options.map_entry = True
    _add(file, "HealthCheckRequest", ("service", 1, _STRING))
    _add(file, "HealthCheckResponse", ("status", 1, _INT32))  # an enum on the wire is a varint, as int32
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return pool


_POOL = _pool()


def _class(name: str) -> Any:  # a generated message class (protobuf types it no further)
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.{name}"))


Status = _class("Status")
ErrorInfo = _class("ErrorInfo")
HealthCheckRequest = _class("HealthCheckRequest")
HealthCheckResponse = _class("HealthCheckResponse")
SERVING = 1
