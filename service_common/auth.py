"""Bearer-token authentication and tenants, for both services.

Token file (`--auth-tokens FILE`, QKVCOMM_AUTH_TOKENS; a Kubernetes Secret): one `TOKEN TENANT`
pair per line; blank lines and `#` comments are skipped. A tenant is 1-64 of [A-Za-z0-9._-].
The tenant `*` marks a relay, a sender calling its receiver: it acts for the tenant each call
names in its `x-qkvcomm-tenant` metadata (none: the default tenant "").

With a token file, every call except health and reflection (probes need them) carries
`authorization: Bearer TOKEN`:
    no token, or one not in the file          -> UNAUTHENTICATED
    a tenant's token naming another tenant     -> PERMISSION_DENIED
Tokens are compared in constant time (their SHA-256 against every entry, no early exit) and never
logged. The file is read again when it changes, so tokens rotate without a restart.

Without a token file the network is the gate (loopback, or mutual TLS): a call's tenant is the one
its `x-qkvcomm-tenant` names, else the default tenant "".

What a tenant means is the services' business: the receiver keys its cards by (tenant, card id),
so one tenant never sees, reuses or replaces another's cards.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import grpc
from qkvcomm_client.channel import TENANT_HEADER

from qkv_core.errors import Refusal
from qkv_core.store.records import DEFAULT_TENANT, TENANT
from service_common.status import error_metadata

log = logging.getLogger(__name__)

RELAY = "*"
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # reachable without a token
Metadata = Iterable[tuple[str, str | bytes]]


class Denied(Refusal):
    """A call without the right credentials; `code` is its status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.status, self.reason = code.name, code.name.lower()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def format_tokens(tokens: dict[str, str]) -> str:
    """A token file's text from {tenant: token}: what parse_tokens reads."""
    return "".join(f"{token} {tenant}\n" for tenant, token in tokens.items())


def parse_tokens(text: str, where: str = "token file") -> list[tuple[bytes, str]]:
    """(SHA-256 of the token, tenant) per line; ValueError naming the line (never the token)."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2 or not (fields[1] == RELAY or TENANT.fullmatch(fields[1])):
            raise ValueError(f"{where} line {number}: expected 'TOKEN TENANT' with a tenant of 1-64 [A-Za-z0-9._-] or "
                             f"'*'")
        entries.append((_digest(fields[0]), fields[1]))
    return entries


class Auth:
    """Who a call is: its tenant, from its metadata (thread-safe)."""

    def __init__(self, token_file: str = ""):
        self.path = Path(token_file) if token_file else None
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._entries: list[tuple[bytes, str]] = []
        if self.path is not None:
            self._reload()
            if not self._entries:
                raise ValueError(f"token file {self.path} holds no tokens")

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def _reload(self) -> None:
        assert self.path is not None
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._entries = parse_tokens(self.path.read_text(), str(self.path))
            self._stamp = stamp
            log.info("read %d tokens from %s", len(self._entries), self.path)

    def _lookup(self, token: str) -> str | None:
        """The token's tenant; every entry is compared, so the time does not depend on which matched."""
        with self._lock:
            try:
                self._reload()
            except (OSError, ValueError) as e:  # a rotation caught halfway: keep the tokens we have
                log.warning("cannot read the token file (%s); keeping the previous tokens", e)
            entries = self._entries
        presented, found = _digest(token), None
        for digest, tenant in entries:
            if hmac.compare_digest(digest, presented):
                found = tenant
        return found

    def tenant(self, metadata: Metadata | None) -> str:
        """The tenant a call acts for; Denied when its credentials do not allow it."""
        values = {k: v.decode() if isinstance(v, bytes) else v for k, v in (metadata or ())}
        named = values.get(TENANT_HEADER, "")
        if named and not TENANT.fullmatch(named):
            raise Denied(grpc.StatusCode.PERMISSION_DENIED, f"{TENANT_HEADER} must be 1-64 of [A-Za-z0-9._-]")
        if not self.enabled:
            return named or DEFAULT_TENANT
        scheme, _, token = values.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "this service needs 'authorization: Bearer TOKEN' metadata")
        owner = self._lookup(token.strip())
        if owner is None:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        if owner == RELAY:
            return named or DEFAULT_TENANT
        if named and named != owner:
            raise Denied(grpc.StatusCode.PERMISSION_DENIED, "this token may not act for another tenant")
        return owner


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call (but health and reflection) whose credentials `Auth` does not accept,
    before the servicer sees it; `on_denied` counts refusals by status."""

    def __init__(self, auth: Auth, on_denied: Callable[[grpc.StatusCode], None]):
        self.auth = auth
        self.on_denied = on_denied

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        try:
            self.auth.tenant(details.invocation_metadata)
        except Denied as e:
            self.on_denied(e.code)
            return _refusal(handler, e)
        return handler


def _refusal(handler: grpc.RpcMethodHandler, denied: Denied) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with `denied`'s status."""

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(denied.code, str(denied), error_metadata(denied.code, str(denied), denied.code.name))

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return kinds[handler.request_streaming, handler.response_streaming](
        refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
