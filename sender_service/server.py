"""The Sender gRPC service: a thin adapter of qkv_core.engine.handoff (the handoff itself) to gRPC."""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from qkvcomm.v1 import services_pb2, services_pb2_grpc
from qkvcomm_client import call_metadata, open_channel

from qkv_core.codec.registry import TEXT, codec_files
from qkv_core.config import ServiceConfig
from qkv_core.engine.handoff import Handoff
from qkv_core.engine.sender import SenderEngine
from qkv_core.errors import RequestError, Unsupported
from qkv_core.model.loaded import LoadedModel
from qkv_core.model.loading import load_model
from qkv_core.wire import pb
from sender_service.receiver_port import BulkRoute, GrpcReceiver, bulk_route, receiver_channel_options, receiver_tls
from service_common.auth import Auth
from service_common.errors import guarded
from service_common.info import InfoServicer, build_info
from service_common.metrics import Metrics
from service_common.server import Running, require_receiver, serve_forever, start

log = logging.getLogger(__name__)
SERVICE = services_pb2.DESCRIPTOR.services_by_name["SenderService"].full_name
class SenderServicer(services_pb2_grpc.SenderServiceServicer):
    def __init__(self, handoff: Handoff, channel: grpc.aio.Channel, metrics: Metrics, cfg: ServiceConfig, auth: Auth,
                 bulk: BulkRoute | None = None):
        self.handoff, self.channel, self.metrics, self.cfg, self.auth = handoff, channel, metrics, cfg, auth
        self.bulk = bulk  # the route to the receiver's bulk channel, if this sender may use one
        metrics.watch_auto(handoff.auto)

    def _port(self, context: grpc.aio.ServicerContext) -> tuple[GrpcReceiver, str]:
        """The receiver on this request's behalf: the deadline is the setting, or the client's
        remaining time if sooner; the tenant is the caller's."""
        remaining = context.time_remaining()
        limit = self.cfg.limits.receiver_timeout_s
        timeout = limit if remaining is None else max(0.0, min(limit, remaining))
        tenant = self.auth.tenant(context.invocation_metadata())
        metadata = call_metadata(self.cfg.receiver_token, tenant)
        return GrpcReceiver(self.channel, timeout, metadata, self.bulk), tenant

    async def _share(self, request: pb.ShareRequest | pb.AskRequest,
                     context: grpc.aio.ServicerContext) -> tuple[pb.HandoffStats, bool, GrpcReceiver]:
        port, tenant = self._port(context)
        stats, facts = await self.handoff.share(request, port, tenant)
        self.metrics.record_handoff(stats)
        return stats, facts, port

    @guarded
    async def Share(self, request: pb.ShareRequest, context: grpc.aio.ServicerContext) -> pb.ShareResponse:
        return pb.ShareResponse(stats=(await self._share(request, context))[0])

    @guarded
    async def Ask(self, request: pb.AskRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.AskResponse]:
        if not request.question.strip():
            raise RequestError("the question is empty")
        start = time.perf_counter()
        stats, facts, _ = await self._share(request, context)
        query = pb.GenerateRequest(
            card_id=stats.card_id, query=request.question, max_new_tokens=request.max_new_tokens, facts=facts
        )
        port, _ = self._port(context)
        first = True
        async for reply in port.stub.Generate(query, **port._call()):
            if reply.HasField("stats"):
                stats.ttft_s = reply.stats.ttft_s
                stats.generated_tokens = reply.stats.generated_tokens
            else:
                if first:  # what the client waited for its first token: the handoff and the receiver's TTFT
                    waited = time.perf_counter() - start
                    self.metrics.ask_ttft.observe(waited)
                    if stats.HasField("auto"):  # measured as predicted: the sender's own prefill excluded
                        stats.auto.measured_s = waited - (0.0 if stats.codec == TEXT else stats.prefill_s)
                    first = False
                yield pb.AskResponse(text=reply.text)
        stats.total_s = time.perf_counter() - start
        yield pb.AskResponse(stats=stats)


def _path(setting: str) -> Path | None:
    return Path(setting) if setting else None


async def start_sender(cfg: ServiceConfig, lm: LoadedModel) -> tuple[Running, grpc.aio.Channel]:
    require_receiver(cfg)
    metrics, auth = Metrics("sender", lm.fingerprint.name), Auth(cfg.auth_tokens)
    tls = receiver_tls(cfg)
    channel = open_channel(cfg.receiver, tls, receiver_channel_options(cfg.receiver_balance), aio=True)
    files = codec_files([cfg.codec, *cfg.codec_files.split(",")])  # the configuration's files, no others
    engine = SenderEngine(lm, _path(cfg.codec_profile), _path(cfg.layer_profile), cfg.limits, files,
                          cfg.context_cache_bytes)
    servicer = SenderServicer(Handoff(engine, cfg), channel, metrics, cfg, auth, bulk_route(cfg, tls))
    running = await start(
        "sender", SERVICE, functools.partial(services_pb2_grpc.add_SenderServiceServicer_to_server, servicer),
        cfg, metrics, auth,
        InfoServicer(build_info("sender", lm, cfg)),
    )
    try:  # tell the operator now; every handoff checks again (cached), so a fixed receiver is picked up
        await servicer.handoff.check_receiver(GrpcReceiver(channel, 5.0, call_metadata(cfg.receiver_token, "")))
    except Unsupported as e:
        log.error("the receiver at %s cannot take this sender's cards: %s", cfg.receiver, e)
    except grpc.aio.AioRpcError as e:  # nothing was cached: the first handoff asks
        log.warning("the receiver at %s did not answer Info yet (%s); handoffs will ask it", cfg.receiver,
                    e.code().name)
    return running, channel


async def main(cfg: ServiceConfig) -> None:
    receiver_tls(cfg)  # refused before the model loads
    lm = load_model(cfg.runtime)
    running, channel = await start_sender(cfg, lm)
    try:
        await serve_forever("sender", running, cfg)
    finally:
        await channel.close()
