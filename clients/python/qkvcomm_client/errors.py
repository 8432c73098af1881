"""A refused call as the client raises it: `QKVCommError`, a grpc.RpcError that carries the
status and the google.rpc.ErrorInfo the services attach to every refusal (reason, domain,
metadata such as sender_model / receiver_model). docs/protocol.md lists the reasons."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from qkvcomm_client import mirrors

STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class ErrorInfo:
    reason: str  # UPPER_SNAKE, e.g. MODEL_MISMATCH
    domain: str  # "qkvcomm.v1"
    metadata: dict[str, str] = field(default_factory=dict)


def error_info(error: grpc.RpcError) -> ErrorInfo | None:
    """The ErrorInfo of a failed call (from its trailing metadata), if it carries one."""
    if isinstance(error, QKVCommError):
        return error.info
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key != STATUS_DETAILS_KEY:
            continue
        status = mirrors.Status.FromString(value)
        for detail in status.details:
            if detail.type_url.endswith("/google.rpc.ErrorInfo"):
                info = mirrors.ErrorInfo.FromString(detail.value)
                return ErrorInfo(info.reason, info.domain, dict(info.metadata))
    return None


class QKVCommError(grpc.RpcError):
    """A call that failed: `code()` and `details()` as on any gRPC error, plus the ErrorInfo's
    `reason`, `domain` and `metadata` (empty when the failure came from the transport)."""

    def __init__(self, code: grpc.StatusCode, message: str, info: ErrorInfo | None = None):
        super().__init__(message)
        self._code, self._message, self.info = code, message, info
        self.reason = info.reason if info else ""
        self.domain = info.domain if info else ""
        self.metadata = dict(info.metadata) if info else {}

    @classmethod
    def of(cls, error: grpc.RpcError) -> QKVCommError:
        return cls(error.code(), error.details() or "", error_info(error))

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def __str__(self) -> str:
        why = f" {self.reason}" if self.reason else ""
        return f"{self._code.name}{why}{f' {self.metadata}' if self.metadata else ''}: {self._message}"


@contextlib.contextmanager
def raised_as_qkvcomm() -> Iterator[None]:
    """Re-raise a gRPC failure inside the block as a QKVCommError."""
    try:
        yield
    except QKVCommError:
        raise
    except grpc.RpcError as e:
        raise QKVCommError.of(e) from None
