"""Channels to the services: TLS options, call credentials, retries.

A client keeps one channel for its lifetime (gRPC multiplexes calls over it and reconnects by
itself). Retries are gRPC's own (a service config on the channel), for the calls that are safe to
repeat: `Info`, `HasCard`, health checks and `Share` (a card's id is its content hash and a held
card is never replaced, so a repeated Share stores nothing twice); only on UNAVAILABLE, with
exponential backoff. `Ask`, `Generate` and `PushText` are never retried: they spend the services'
compute.
"""
from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

TENANT_HEADER = "x-qkvcomm-tenant"  # the tenant a relay token (tenant '*') acts for
IDEMPOTENT = (
    {"service": "qkvcomm.v1.InfoService"},
    {"service": "qkvcomm.v1.ReceiverService", "method": "HasCard"},
    {"service": "qkvcomm.v1.SenderService", "method": "Share"},
    {"service": "grpc.health.v1.Health"},
)


@dataclass(frozen=True)
class ClientTLS:
    """How a client reaches a server: plaintext when nothing is set; TLS when a CA or a client
    certificate is given (no CA: the system's roots)."""

    ca: str = ""  # CA bundle (PEM) that signed the server's certificate
    cert: str = ""  # client certificate (PEM), for servers that require one (mTLS)
    key: str = ""  # its key
    server_name: str = ""  # the name to check the server's certificate against, when not the host dialled
    insecure: bool = False  # allow a bearer token in plaintext to a host off loopback (warned about once)

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert)

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def retry_config(retries: int, first_backoff: str = "0.2s", max_backoff: str = "3s") -> dict:
    """The gRPC method config that retries the idempotent calls up to `retries` more times (at most
    4: gRPC's cap) on UNAVAILABLE, backing off from `first_backoff` doubling to `max_backoff`."""
    policy = {"maxAttempts": min(retries + 1, 5), "initialBackoff": first_backoff, "maxBackoff": max_backoff,
              "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
    return {"name": list(IDEMPOTENT), "retryPolicy": policy}


def retry_options(retries: int) -> list[tuple[str, str]]:
    """Channel options that retry the idempotent calls up to `retries` more times on UNAVAILABLE."""
    if retries <= 0:
        return []
    return [("grpc.service_config", json.dumps({"methodConfig": [retry_config(retries)]}))]


def open_channel(target: str, tls: ClientTLS = ClientTLS(), options: Sequence[tuple[str, object]] = (),
                 aio: bool = False):
    """A channel to `target` (HOST:PORT), TLS when `tls` is enabled; `aio` for a grpc.aio channel."""
    module = grpc.aio if aio else grpc
    if not tls.enabled:
        return module.insecure_channel(target, options=list(options))
    return module.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])


class PlaintextToken(ValueError):
    """A bearer token would travel in plaintext off this host."""


def is_loopback_host(host: str) -> bool:
    """Whether a host name or address (IPv6 with or without brackets) is this host's loopback."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback(target: str) -> bool:
    """Whether a gRPC target (HOST:PORT, [V6]:PORT, dns:///HOST:PORT, unix:PATH) stays on this host."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    address = target.removeprefix("dns:").removeprefix("///")
    return is_loopback_host(address.rsplit(":", 1)[0] if ":" in address else address)


_warned: set[str] = set()


def check_token_transport(target: str, tls: ClientTLS, token: str) -> None:
    """PlaintextToken when `token` would go to `target` in plaintext and `target` is not on this host,
    unless `tls.insecure` says so (then a warning, once per target)."""
    if not token or tls.enabled or is_loopback(target):
        return
    if not tls.insecure:
        raise PlaintextToken(f"refusing to send a bearer token in plaintext to {target}: give the server's CA "
                             "(--ca) so the channel speaks TLS, or --insecure to send it in the clear anyway")
    if target not in _warned:
        _warned.add(target)
        log.warning("sending a bearer token in plaintext to %s (--insecure): anyone on the path can read it", target)


def call_metadata(token: str, tenant: str = "") -> list[tuple[str, str]]:
    """What a client (or a relaying sender) sends: its bearer token and, when there is one, the tenant."""
    metadata = [("authorization", f"Bearer {token}")] if token else []
    return metadata + ([(TENANT_HEADER, tenant)] if tenant else [])
