"""The receiver's bulk channel: a card's layer data beside gRPC (PushCardBulk), at the link's rate.

gRPC stays the control plane. PushCardBulk checks a card's header and admits it (limits, memory)
before a byte of its data is buffered, then hands the sender a one-time ticket: 32 random bytes,
good for one connection to this port until the receiver's idle timeout passes. A bulk connection
sends the token, then every layer's bytes in order, nothing else: each layer is read with
recv_into straight into a buffer of its declared size, added to the card's digest and handed to
the call, which decodes it in a worker thread while this one reads the next. A connection with an
unknown or spent token is closed unread. One that stalls for idle_timeout_s, ends early, or sends
bytes whose digest is not the card's id fails its card (the call's status says which), and nothing
is kept. With TLS on the gRPC port the bulk port speaks TLS with the same certificate, and asks
for client certificates when the gRPC port does.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from qkv_core.config import ServiceConfig
from qkv_core.errors import CardError, ErrorKind
from service_common.errors import IdleTimeout

log = logging.getLogger(__name__)
TOKEN_BYTES = 32


@dataclass
class Expected:
    """One admitted card waiting for its data: its layers in order, and where each goes."""

    layers: list[tuple[int, int]]  # (layer index, bytes)
    take: Callable[[int, bytearray], None]  # the reader's take_layer: order, size, the card's content hash
    loop: asyncio.AbstractEventLoop
    arrived: asyncio.Queue = field(default_factory=asyncio.Queue)  # layer indices, then None or an exception
    connection: socket.socket | None = None
    closed: bool = False

    def tell(self, item: int | BaseException | None) -> None:
        self.loop.call_soon_threadsafe(self.arrived.put_nowait, item)

    def abort(self) -> None:
        """The call ended: stop reading its connection, if one is open."""
        self.closed = True
        if self.connection is not None:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)


class BulkServer:
    def __init__(self, cfg: ServiceConfig):
        """Listens on cfg.host at cfg.bulk_port (-1: any free port); TLS as the gRPC port."""
        self.idle_s = cfg.limits.idle_timeout_s
        self.tls = server_tls(cfg)
        family = socket.AF_INET6 if ":" in cfg.host.strip("[]") else socket.AF_INET
        self.sock = socket.create_server((cfg.host.strip("[]"), max(0, cfg.bulk_port)), family=family)
        self.port = self.sock.getsockname()[1]
        self._tickets: dict[bytes, Expected] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="bulk-accept", daemon=True).start()

    def expect(self, expected: Expected) -> bytes:
        token = secrets.token_bytes(TOKEN_BYTES)
        with self._lock:
            self._tickets[token] = expected
        return token

    def forget(self, token: bytes) -> None:
        with self._lock:
            expected = self._tickets.pop(token, None)
        if expected is not None:
            expected.abort()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(conn,), name="bulk-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(self.idle_s)
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)  # conn now the TLS socket (the TCP one detached)
            self._receive(conn)
        except (OSError, CardError):
            return
        finally:
            conn.close()

    def _receive(self, conn: socket.socket) -> None:
        token = bytes(_read_exactly(conn, bytearray(TOKEN_BYTES)))
        with self._lock:
            expected = self._tickets.pop(token, None)  # spent as it is used
        if expected is None:
            log.info("bulk connection with an unknown or spent ticket: closed")
            return
        expected.connection = conn
        try:
            for index, size in expected.layers:
                data = _read_exactly(conn, bytearray(size), expected)
                expected.take(index, data)
                expected.tell(index)  # decoded by the call's worker while the next layer arrives
            expected.tell(None)
        except TimeoutError:
            expected.tell(IdleTimeout(f"the bulk stream sent nothing for {self.idle_s:g} s "
                                      "(idle_timeout_s, QKVCOMM_IDLE_TIMEOUT_S)"))
        except Exception as e:  # noqa: BLE001 - handed to the call, which turns it into its status
            expected.tell(e)


def _read_exactly(conn: socket.socket, buf: bytearray, expected: Expected | None = None) -> bytearray:
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = conn.recv_into(view[got:])
        if not n or (expected is not None and expected.closed):
            raise CardError(ErrorKind.DATA_LOSS, f"the bulk stream ended {len(buf) - got} bytes short of a layer")
        got += n
    return buf


def server_tls(cfg: ServiceConfig) -> ssl.SSLContext | None:
    """The gRPC port's TLS for the bulk port: its certificate, and its client CA when it has one."""
    if not cfg.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    if cfg.tls_client_ca:
        context.load_verify_locations(cfg.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
