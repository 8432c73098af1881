"""Whose fault a refusal is, as exception types the services map to gRPC status codes.

    RequestError      the caller asked for something malformed or impossible   INVALID_ARGUMENT
    Unsupported       well-formed, but this deployment cannot do it            FAILED_PRECONDITION
    LimitExceeded     more than a configured limit allows                      RESOURCE_EXHAUSTED
    Cancelled         the caller went away, and the work was stopped            CANCELLED
    CardError         a card that fails a check; its ErrorKind names the status (below)

Each refusal names its gRPC status (by name: qkv_core knows no gRPC) and the reason the services
count it under; service_common.errors maps every Refusal by these two, with no list of its own.
Anything else, a plain ValueError included, is the server's fault: INTERNAL, logged. RequestError
and Unsupported are ValueErrors, so library callers that catch ValueError keep working. Each may
carry `details`, machine-readable facts (the two models, the limit) that the services send as
the metadata of the status's google.rpc.ErrorInfo.
"""
from __future__ import annotations

import enum


class Refusal(Exception):
    """A request refused for a reason its status names; `details` are machine-readable facts."""

    status = "INTERNAL"  # a grpc.StatusCode name
    reason = "internal"  # the metric label and ErrorInfo reason

    def __init__(self, message: str = "", details: dict[str, str] | None = None):
        super().__init__(message)
        self.details = details or {}


class RequestError(Refusal, ValueError):
    """The caller's request is malformed or impossible (a bad codec name, an empty question)."""

    status, reason = "INVALID_ARGUMENT", "invalid"


class Unsupported(Refusal, ValueError):
    """A well-formed request this deployment cannot serve (a model without the capability)."""

    status, reason = "FAILED_PRECONDITION", "precondition"


class LimitExceeded(Refusal):
    """A request asks for more than a configured limit allows."""

    status, reason = "RESOURCE_EXHAUSTED", "limit"


class Cancelled(Refusal):
    """The caller went away; the work stopped at its next checkpoint."""

    status, reason = "CANCELLED", "cancelled"


class ErrorKind(enum.Enum):
    """What is wrong with a card: (the status it is answered with, what it means)."""

    INVALID = ("INVALID_ARGUMENT", "malformed frames or header")
    PRECONDITION = ("FAILED_PRECONDITION", "well-formed, but not for this receiver")
    DATA_LOSS = ("DATA_LOSS", "checksum, digest or truncation")
    TOO_LARGE = ("RESOURCE_EXHAUSTED", "larger than this receiver takes")
    NOT_FOUND = ("NOT_FOUND", "no such card")
    PARENT_MISSING = ("FAILED_PRECONDITION", "a delta card whose parent this receiver does not hold: send it whole")


class CardError(Refusal):
    def __init__(self, kind: ErrorKind, message: str, details: dict[str, str] | None = None):
        super().__init__(message, details)
        self.kind = kind
        self.status, self.reason = kind.value[0], kind.name.lower()
