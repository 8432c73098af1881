"""The sender's channel to its receiver, and the handoff's port over it (qkv_core.engine.handoff.
ReceiverPort): one GrpcReceiver per request, with the request's deadline and credentials."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from qkvcomm.v1 import services_pb2_grpc
from qkvcomm_client import ClientTLS, check_token_transport, error_info
from qkvcomm_client.channel import retry_config

from qkv_core.card.framing import frames
from qkv_core.config import ServiceConfig
from qkv_core.errors import CardError, ErrorKind, Refusal
from qkv_core.wire import pb, push_requests
from service_common.server import GRPC_OPTIONS

log = logging.getLogger(__name__)
# The channel to the receiver: idempotent lookups (HasCard, Info) are retried on UNAVAILABLE (a
# receiver restarting), and reconnection backs off from 100 ms, not gRPC's default 1 s doubling to
# 120 s, so the first Ask after a receiver restart finds it. PushCard is a client stream, which gRPC
# does not retry; the sender pushes a card again itself after a broken stream (UNAVAILABLE), once:
# the card id is its content.
PUSH_ATTEMPTS = 2


def receiver_channel_options(balance: str) -> list[tuple[str, object]]:
    """`balance`: gRPC's load-balancing policy over the receiver's addresses. pick_first keeps a
    card and its questions on one receiver; round_robin spreads calls over every address the name
    resolves to (a headless Service), which is right only when the receivers share a store tier."""
    if balance not in ("pick_first", "round_robin"):
        raise ValueError(f"receiver_balance must be pick_first or round_robin, not {balance!r}")
    config = {"loadBalancingConfig": [{balance: {}}], "methodConfig": [retry_config(4, "0.1s", "1s")]}
    return [
        *GRPC_OPTIONS,
        ("grpc.service_config", json.dumps(config)),
        ("grpc.enable_retries", 1),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


class BulkBroken(Refusal):
    """The bulk connection failed while the receiver's call reported nothing (it was cut off)."""

    status, reason = "UNAVAILABLE", "upstream_unavailable"


@dataclass(frozen=True)
class BulkRoute:
    """Where the receiver's bulk channel is: on the host the sender dials for gRPC, with its TLS."""

    host: str
    tls: ClientTLS


def bulk_route(cfg: ServiceConfig, tls: ClientTLS) -> BulkRoute | None:
    """The route for --receiver, or None when the sender may not use a bulk channel: turned off, or
    possibly several receivers behind the target (a ticket is good only at the receiver that issued
    it, and the bulk connection must reach that one): round_robin, a list, or a name with several
    addresses (a headless Service)."""
    target = cfg.receiver
    for scheme in ("ipv4:", "ipv6:", "dns:///", "dns:"):
        target = target.removeprefix(scheme)
    if not cfg.receiver_bulk or cfg.receiver_balance != "pick_first" or "," in target:
        return None
    host = (target.rsplit(":", 1)[0] if target.count(":") == 1 or target.startswith("[") else target).strip("[]")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        addresses = set()
    if len(addresses) != 1:
        log.info("not using the receiver's bulk channel: %s resolves to %d addresses", host, len(addresses))
        return None
    return BulkRoute(host, tls)


def send_bulk(route: BulkRoute, ticket: pb.BulkTicket, blobs: list[bytes], timeout: float) -> None:
    """The ticket's token, then every layer's bytes, on one connection to the bulk port; then a
    half-close, and what the receiver sent (TLS session tickets) read until it closes: closing with
    unread bytes would reset the connection and cut the data still in flight."""
    sock = socket.create_connection((route.host, ticket.port), timeout=timeout)
    try:
        if ticket.tls:
            context = ssl.create_default_context(cafile=route.tls.ca or None)
            if route.tls.cert:
                context.load_cert_chain(route.tls.cert, route.tls.key)
            sock = context.wrap_socket(sock, server_hostname=route.tls.server_name or route.host)
        sock.sendall(ticket.token)
        for blob in blobs:
            sock.sendall(blob)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 16):
            pass
    finally:
        sock.close()


class GrpcReceiver:
    """The handoff's port to the receiver (qkv_core.engine.handoff.ReceiverPort) over the sender's
    channel, for one request: its deadline (`timeout`, seconds) and metadata (the sender's token,
    the caller's tenant); `bulk`: the route to the receiver's bulk channel, if the sender may use one."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float, metadata: list[tuple[str, str]],
                 bulk: BulkRoute | None = None):
        self.channel, self.timeout, self.metadata, self.bulk = channel, timeout, metadata, bulk
        self.stub = services_pb2_grpc.ReceiverServiceStub(channel)
        self.meta = services_pb2_grpc.InfoServiceStub(channel)

    def _call(self, since: float | None = None) -> dict:
        left = self.timeout if since is None else max(0.0, self.timeout - (time.perf_counter() - since))
        return {"timeout": left, "metadata": self.metadata}

    async def ready(self) -> None:
        """A receiver that is starting (or restarting) is waited for, not refused with the channel's
        last error while its reconnection backs off; if it never comes, the first call fails."""
        if self.channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.channel.channel_ready(), self.timeout)

    async def info(self) -> pb.InfoResponse | None:
        try:
            return await self.meta.Info(pb.InfoRequest(), timeout=min(self.timeout, 10.0),
                                        metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            return None

    async def probe(self, payload: bytes) -> None:
        await self.meta.Probe(pb.ProbeRequest(payload=payload), **self._call())

    async def has_card(self, card_id: str) -> bool:
        return (await self.stub.HasCard(pb.HasCardRequest(card_id=card_id), **self._call())).present

    async def find_prefix(self, hashes: list[bytes], codecs: list[str]) -> pb.FindPrefixResponse:
        return await self.stub.FindPrefix(pb.FindPrefixRequest(block_hashes=hashes, codecs=codecs), **self._call())

    async def push_card(self, header: pb.CardHeader, blobs: list[bytes],
                        bulk: bool) -> tuple[pb.PushCardResponse, int]:
        try:
            if bulk and self.bulk is not None:
                return await self._push_bulk(header, blobs)
            return await self._push_frames(header, blobs)
        except grpc.aio.AioRpcError as e:
            if _parent_missing(e):
                raise CardError(ErrorKind.PARENT_MISSING, e.details() or "parent missing") from e
            raise

    async def _push_frames(self, header: pb.CardHeader, blobs: list[bytes]) -> tuple[pb.PushCardResponse, int]:
        sent = 0

        def counted() -> Iterator[pb.CardFrame]:
            nonlocal sent
            sent = 0
            for frame in frames(header, blobs):
                sent += frame.ByteSize()
                yield frame

        t0 = time.perf_counter()
        for attempt in range(PUSH_ATTEMPTS):
            try:
                return await self.stub.PushCard(push_requests(counted()), **self._call(since=t0)), sent
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == PUSH_ATTEMPTS - 1:
                    raise
                log.warning("the stream to the receiver broke (%s); pushing the card again", e.details())
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _push_bulk(self, header: pb.CardHeader, blobs: list[bytes]) -> tuple[pb.PushCardResponse, int]:
        """PushCardBulk: the header and its ticket over gRPC, the layers over the bulk channel."""
        assert self.bulk is not None
        t0 = time.perf_counter()
        call = self.stub.PushCardBulk(pb.PushCardBulkRequest(header=header), **self._call())
        try:
            first = await call.read()
            if first is grpc.aio.EOF or not first.HasField("ticket"):
                raise RuntimeError("the receiver answered PushCardBulk without a ticket")
            try:
                await asyncio.to_thread(send_bulk, self.bulk, first.ticket, blobs, self._call(since=t0)["timeout"])
            except OSError as e:
                await call.read()  # the receiver's own status says why, when it has one
                raise BulkBroken(f"the receiver's bulk channel broke: {e}") from e
            last = await call.read()
        finally:
            call.cancel()  # a no-op once the call is done
        if last is grpc.aio.EOF or not last.HasField("done"):
            raise RuntimeError("the receiver ended PushCardBulk without the card's reply")
        sent = pb.PushCardBulkRequest(header=header).ByteSize() + len(first.ticket.token) + sum(len(b) for b in blobs)
        return last.done, sent

    async def push_text(self, request: pb.PushTextRequest) -> pb.PushTextResponse:
        return await self.stub.PushText(request, **self._call())


def _parent_missing(error: grpc.aio.AioRpcError) -> bool:
    """The receiver refused a delta card because it does not hold its parent (any more)."""
    info = error_info(error)
    return error.code() == grpc.StatusCode.FAILED_PRECONDITION and info is not None and info.reason == "PARENT_MISSING"


def receiver_tls(cfg: ServiceConfig) -> ClientTLS:
    """How the sender reaches its receiver; PlaintextToken when its token would cross the network in clear."""
    tls = ClientTLS(cfg.receiver_ca, cfg.receiver_cert, cfg.receiver_key, cfg.receiver_server_name,
                    cfg.receiver_insecure)
    check_token_transport(cfg.receiver, tls, cfg.receiver_token)
    return tls
