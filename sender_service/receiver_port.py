"""The sender's channel to its receiver, and the handoff's port over it (qkv_core.engine.handoff.
ReceiverPort): one GrpcReceiver per request, with the request's deadline and credentials."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable

import grpc
from qkvcomm.v1 import services_pb2_grpc
from qkvcomm_client import ClientTLS, check_token_transport, error_info
from qkvcomm_client.channel import retry_config

from qkv_core.config import ServiceConfig
from qkv_core.errors import CardError, ErrorKind
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


class GrpcReceiver:
    """The handoff's port to the receiver (qkv_core.engine.handoff.ReceiverPort) over the sender's
    channel, for one request: its deadline (`timeout`, seconds) and metadata (the sender's token,
    the caller's tenant)."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float, metadata: list[tuple[str, str]]):
        self.channel, self.timeout, self.metadata = channel, timeout, metadata
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

    async def push_card(self, card: Callable[[], Iterable[pb.CardFrame]]) -> pb.PushCardResponse:
        t0 = time.perf_counter()
        for attempt in range(PUSH_ATTEMPTS):
            try:
                return await self.stub.PushCard(push_requests(card()), **self._call(since=t0))
            except grpc.aio.AioRpcError as e:
                if _parent_missing(e):
                    raise CardError(ErrorKind.PARENT_MISSING, e.details() or "parent missing") from e
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == PUSH_ATTEMPTS - 1:
                    raise
                log.warning("the stream to the receiver broke (%s); pushing the card again", e.details())
        raise AssertionError("unreachable: the last attempt returns or raises")

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
