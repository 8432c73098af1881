"""Whose fault a refusal is, as exception types the services map to gRPC status codes.

    RequestError      the caller asked for something malformed or impossible   INVALID_ARGUMENT
    Unsupported       well-formed, but this deployment cannot do it            FAILED_PRECONDITION
    LimitExceeded     more than a configured limit allows                      RESOURCE_EXHAUSTED
    Cancelled         the caller went away, and the work was stopped            CANCELLED
Card checks raise qkv_core.card.header.CardError, whose kind names the status. Anything else,
a plain ValueError included, is the server's fault: INTERNAL, logged. RequestError and
Unsupported are ValueErrors, so library callers that catch ValueError keep working. Each may
carry `details`, machine-readable facts (the two models, the limit) that the services send as
the metadata of the status's google.rpc.ErrorInfo.
"""
from __future__ import annotations


class Detailed(Exception):
    """An error with machine-readable details beside its message."""

    def __init__(self, message: str = "", details: dict[str, str] | None = None):
        super().__init__(message)
        self.details = details or {}


class RequestError(Detailed, ValueError):
    """The caller's request is malformed or impossible (a bad codec name, an empty question)."""


class Unsupported(Detailed, ValueError):
    """A well-formed request this deployment cannot serve (a model without the capability)."""


class LimitExceeded(Detailed):
    """A request asks for more than a configured limit allows."""


class Cancelled(Exception):
    """The caller went away; the work stopped at its next checkpoint (CANCELLED)."""
