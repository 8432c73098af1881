"""Map library errors to gRPC status codes, so bad input gets a clear status and the server lives on.
Whose fault is whose: qkv_core.errors; a plain ValueError is a server fault (INTERNAL, logged)."""
from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from qkvcomm_client import error_info

from qkv_core.errors import Refusal
from service_common.auth import Auth, Denied
from service_common.status import error_metadata

log = logging.getLogger(__name__)
access = logging.getLogger("qkvcomm.access")  # one line per call

_MISCONFIGURED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class IdleTimeout(Refusal):
    """A client stream sent nothing for longer than the idle timeout."""

    status, reason = "DEADLINE_EXCEEDED", "idle"


def status_of(error: Exception) -> tuple[grpc.StatusCode, str, str]:
    """(code, message, metric reason) for an exception raised while serving a call."""
    if isinstance(error, Refusal):  # each names its status and reason (qkv_core.errors)
        return grpc.StatusCode[error.status], str(error), error.reason
    if isinstance(error, DecodeError):  # a frame that is no protobuf message of its type: the client's bytes
        return grpc.StatusCode.INVALID_ARGUMENT, f"undecodable message: {error}", "undecodable"
    if isinstance(error, grpc.aio.AioRpcError) and error.code() in _MISCONFIGURED:
        # the receiver refused the sender's own credentials: the sender's configuration, not the client's doing
        return (grpc.StatusCode.INTERNAL, f"the receiver refused this sender's credentials: {error.details()}",
                "upstream_auth")
    if isinstance(error, grpc.aio.AioRpcError):  # a peer's status, passed on
        return error.code(), f"receiver: {error.details()}", f"upstream_{error.code().name.lower()}"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}", "internal"


def details_of(error: Exception) -> dict[str, str]:
    """The ErrorInfo metadata of a refusal: its own details, or a receiver's passed on."""
    if isinstance(error, Refusal):
        return error.details
    if isinstance(error, grpc.aio.AioRpcError) and (upstream := error_info(error)) is not None:
        return {**upstream.metadata, "upstream_reason": upstream.reason}
    return {}


def tenant_tag(auth: Auth, metadata: Any) -> str:
    """Whose call it was, for a log line: 8 hex digits of the tenant's SHA-256 (never the name, never
    a token); "-" for the default tenant."""
    try:
        tenant = auth.tenant(metadata)
    except Denied:
        return "?"
    return hashlib.sha256(tenant.encode()).hexdigest()[:8] if tenant else "-"


class _Served:
    """One RPC in the metrics and the access log: in flight while it runs, then counted by its
    final status and logged at INFO (logger qkvcomm.access: method, status, milliseconds, tenant
    tag, and a refusal's reason and message); a failure is counted by reason and ends the call with
    its status and ErrorInfo."""

    def __init__(self, servicer: Any, method: str, context: grpc.aio.ServicerContext):
        self.metrics, self.auth, self.method, self.status = servicer.metrics, servicer.auth, method, "OK"
        self.context, self.why, self.start = context, "", time.perf_counter()
        self.refusal: dict[str, str] = {}

    def __enter__(self) -> _Served:
        self.metrics.in_flight.labels(self.metrics.model_name, self.method).inc()
        return self

    def cancelled(self) -> None:
        self.status = "CANCELLED"
        self.metrics.errors.labels(reason="cancelled").inc()

    async def abort(self, context: grpc.aio.ServicerContext, error: Exception) -> None:
        if context.cancelled():  # the client went away (a truncated stream is its doing, not data loss)
            self.cancelled()
            return
        code, message, reason = status_of(error)
        self.status, self.why = code.name, f" reason={reason} {message!r}"
        self.refusal = {"reason": reason, "error": message}
        self.metrics.errors.labels(reason=reason).inc()
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error", exc_info=error)
        await context.abort(code, message, error_metadata(code, message, reason, details_of(error)))

    def __exit__(self, *exc: object) -> None:
        m = self.metrics
        m.in_flight.labels(m.model_name, self.method).dec()
        m.requests.labels(m.model_name, self.method, self.status).inc()
        ms, tenant = (time.perf_counter() - self.start) * 1e3, tenant_tag(self.auth, self.context.invocation_metadata())
        access.info("%s %s %s %.1f ms tenant=%s%s", m.service, self.method, self.status, ms, tenant, self.why,
                    extra={"fields": {"service": m.service, "method": self.method, "status": self.status,
                                      "ms": round(ms, 1), "tenant": tenant, **self.refusal}})


def guarded(method: Callable) -> Callable:
    """Servicer method decorator: any exception becomes a clear status, counted by reason, and
    every call is counted by method and status and logged. The servicer holds its Metrics as
    `self.metrics` and its Auth as `self.auth`."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
            with _Served(self, method.__name__, context) as served:
                try:
                    async for item in method(self, request, context):
                        yield item
                except (grpc.aio.AbortError, GeneratorExit):
                    raise
                except asyncio.CancelledError:
                    served.cancelled()
                    raise
                except Exception as e:  # noqa: BLE001 - every failure must reach the client as a status
                    await served.abort(context, e)

        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        with _Served(self, method.__name__, context) as served:
            try:
                return await method(self, request, context)
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                served.cancelled()
                raise
            except Exception as e:  # noqa: BLE001
                await served.abort(context, e)

    return unary
