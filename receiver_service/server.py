"""The Receiver gRPC service, a thin shell over qkv_core.engine.receiver."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2
from qkvcomm.v1 import services_pb2, services_pb2_grpc

from qkv_core.config import ServiceConfig
from qkv_core.engine.answering import Generation, answer_engine
from qkv_core.engine.performance import measure
from qkv_core.engine.receiver import Intake, ReceiverEngine
from qkv_core.errors import Unsupported
from qkv_core.model.loaded import LoadedModel
from qkv_core.wire import pb
from receiver_service.bulk import BulkServer, Expected
from service_common.auth import Auth
from service_common.errors import IdleTimeout, guarded
from service_common.info import InfoServicer, build_info
from service_common.metrics import Metrics
from service_common.server import Running, iterate_in_thread, serve_forever, start

log = logging.getLogger(__name__)
SERVICE = services_pb2.DESCRIPTOR.services_by_name["ReceiverService"].full_name


class _Decoding:
    """A card's layers decoded in worker threads, in order, each after the one before it: the
    network is never waited on for decoding, nor decoding on the network."""

    def __init__(self, intake: Intake):
        self.intake = intake
        self.last: asyncio.Future | None = None

    def add(self, index: int) -> None:
        self.last = asyncio.ensure_future(self._after(self.last, index))

    async def _after(self, previous: asyncio.Future | None, index: int) -> None:
        if previous is not None:
            await previous
        await asyncio.to_thread(self.intake.decode, index)

    async def done(self) -> None:
        """Every layer added so far is decoded (a decoding fault is raised)."""
        if self.last is not None:
            await self.last

    async def settle(self) -> None:
        """After a failure: wait out the threads (the intake is released only once none decodes into it)."""
        if self.last is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.last)


class ReceiverServicer(services_pb2_grpc.ReceiverServiceServicer):
    def __init__(self, engine: ReceiverEngine, metrics: Metrics, cfg: ServiceConfig, auth: Auth,
                 bulk: BulkServer | None = None):
        self.engine = engine
        self.metrics = metrics
        self.cfg = cfg
        self.auth = auth
        self.bulk = bulk

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        """Whose cards a call sees (the interceptor has already refused calls it may not make)."""
        return self.auth.tenant(context.invocation_metadata())

    @guarded
    async def PushCard(self, request_iterator: AsyncIterator[pb.PushCardRequest], context: grpc.aio.ServicerContext,
                       ) -> pb.PushCardResponse:
        tenant = self._tenant(context)
        with self.engine.intake(tenant) as intake:
            try:
                await self._take_in(aiter(request_iterator), intake)
            finally:
                self.metrics.wire_bytes_received.inc(intake.reader.wire_bytes)
            return await self._keep(intake, tenant)

    @guarded
    async def PushCardBulk(self, request: pb.PushCardBulkRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PushCardBulkResponse]:
        if self.bulk is None:
            raise Unsupported("this receiver has no bulk channel (bulk_port 0): push the card with PushCard")
        tenant = self._tenant(context)
        with self.engine.intake(tenant) as intake:
            try:
                await asyncio.to_thread(intake.feed, pb.CardFrame(header=request.header))  # admitted before data
                reader = intake.reader
                expected = Expected(reader.bulk_layers(), reader.take_layer, asyncio.get_running_loop())
                token = self.bulk.expect(expected)
                try:
                    yield pb.PushCardBulkResponse(ticket=pb.BulkTicket(token=token, port=self.bulk.port,
                                                                       tls=self.bulk.tls is not None))
                    await self._decode_arrivals(expected.arrived, intake)
                finally:
                    self.bulk.forget(token)
                    expected.abort()
                intake.reader.finish_bulk()
            finally:
                self.metrics.wire_bytes_received.inc(intake.reader.wire_bytes)
            yield pb.PushCardBulkResponse(done=await self._keep(intake, tenant))

    async def _keep(self, intake: Intake, tenant: str) -> pb.PushCardResponse:
        """Store a card that arrived whole (writing through to disk and Redis) and count it."""
        card = intake.finish(self.engine.lm.num_layers)
        record = intake.record()
        await asyncio.to_thread(self.engine.store.put, card, record, tenant)
        m = self.metrics
        m.cards_received.inc()
        if card.header.parent_card_id:
            m.delta_cards.inc()
            m.card_tokens.labels("reused").inc(card.header.parent_tokens)
        m.card_tokens.labels("sent").inc(card.header.context_tokens - card.header.parent_tokens)
        m.observe("dequantize", intake.dequantize_s)
        return pb.PushCardResponse(
            card_id=card.header.card_id, wire_bytes=intake.reader.wire_bytes, dequantize_s=intake.dequantize_s
        )

    async def _decode_arrivals(self, arrived: asyncio.Queue, intake: Intake) -> None:
        """Decode each layer the bulk channel completes, in order, while the next arrives; returns
        once the last is decoded. IdleTimeout when nothing comes for idle_timeout_s, or the card is
        not complete by intake_timeout_s."""
        loop = asyncio.get_running_loop()
        limits = self.cfg.limits
        deadline = loop.time() + limits.intake_timeout_s
        decoding = _Decoding(intake)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(arrived.get(), max(0.0, min(limits.idle_timeout_s,
                                                                              deadline - loop.time())))
                except TimeoutError:
                    raise IdleTimeout(f"the card's bulk data did not come within {limits.idle_timeout_s:g} s "
                                      f"(idle_timeout_s), or {limits.intake_timeout_s:g} s in all") from None
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                decoding.add(item)
        except BaseException:
            await decoding.settle()
            raise
        await decoding.done()

    async def _take_in(self, requests: AsyncIterator[pb.PushCardRequest], intake: Intake) -> None:
        """Feed a card's frames to its intake as they arrive. Each complete layer is decoded in a
        worker thread, in order, while the next frames are read: decoding waits for the layer before
        it, never the network for decoding. Returns once the last layer is decoded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.limits.intake_timeout_s  # a stream that trickles frames is dropped too
        decoding = _Decoding(intake)
        try:
            while (frame := await self._next_frame(requests, deadline)) is not None:
                kind = frame.WhichOneof("frame")
                if kind == "trailer":  # a layer's fault is reported before the trailer's
                    await decoding.done()
                if kind == "header":  # validating a header can take a while: off the loop
                    ready = await asyncio.to_thread(intake.feed, frame)
                else:
                    ready = intake.feed(frame)
                if ready is not None:
                    decoding.add(ready)
        except BaseException:
            await decoding.settle()
            raise
        await decoding.done()

    async def _next_frame(self, requests: AsyncIterator[pb.PushCardRequest], deadline: float) -> pb.CardFrame | None:
        """The stream's next frame, None at its end; IdleTimeout when it sends nothing for
        idle_timeout_s or runs past its intake deadline."""
        limits = self.cfg.limits
        wait_s = min(limits.idle_timeout_s, deadline - asyncio.get_running_loop().time())
        try:
            return (await asyncio.wait_for(anext(requests), max(0.0, wait_s))).frame
        except StopAsyncIteration:
            return None
        except TimeoutError:
            if wait_s < limits.idle_timeout_s:
                raise IdleTimeout(f"the card stream took longer than {limits.intake_timeout_s:g} s "
                                  "(intake_timeout_s, QKVCOMM_INTAKE_TIMEOUT_S)") from None
            raise IdleTimeout(f"the card stream sent nothing for {limits.idle_timeout_s:g} s "
                              "(idle_timeout_s, QKVCOMM_IDLE_TIMEOUT_S)") from None

    @guarded
    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        stats = Generation(request.card_id)
        max_new = request.max_new_tokens or self.cfg.max_new_tokens
        pieces = self.engine.generate(request.card_id, request.query, max_new, request.facts, stats,
                                      self._tenant(context))
        async for piece in iterate_in_thread(pieces):
            yield pb.GenerateResponse(text=piece)
        self.metrics.ttft.observe(stats.ttft_s)
        self.metrics.observe("generate", stats.total_s)
        self.metrics.generation_tokens.inc(stats.tokens)
        self.metrics.cached_tokens.inc(stats.cached_tokens)
        yield pb.GenerateResponse(stats=pb.GenerateStats(
            ttft_s=stats.ttft_s, total_s=stats.total_s, generated_tokens=stats.tokens
        ))

    @guarded
    async def PushText(self, request: pb.PushTextRequest, context: grpc.aio.ServicerContext) -> pb.PushTextResponse:
        wire = request.ByteSize()
        self.metrics.wire_bytes_received.inc(wire)
        card, prefill_s = await asyncio.to_thread(self.engine.accept_text, request.context, self._tenant(context))
        self.metrics.observe("prefill", prefill_s)
        self.metrics.prompt_tokens.inc(card.header.context_tokens)
        return pb.PushTextResponse(card_id=card.header.card_id, wire_bytes=wire, prefill_s=prefill_s)

    @guarded
    async def HasCard(self, request: pb.HasCardRequest, context: grpc.aio.ServicerContext) -> pb.HasCardResponse:
        # a card on disk or in Redis is brought up (and verified) here: off the event loop
        header = await asyncio.to_thread(self.engine.store.has, request.card_id, self._tenant(context))
        if header is None:
            return pb.HasCardResponse(present=False)
        return pb.HasCardResponse(present=True, context_tokens=header.context_tokens)

    @guarded
    async def FindPrefix(self, request: pb.FindPrefixRequest,
                         context: grpc.aio.ServicerContext) -> pb.FindPrefixResponse:
        found = await asyncio.to_thread(self.engine.find_prefix, request.block_hashes, self._tenant(context),
                                        request.codecs)
        if found is None:
            return pb.FindPrefixResponse()
        return pb.FindPrefixResponse(card_id=found[0], tokens=found[1])


def load_for(cfg: ServiceConfig) -> LoadedModel:
    """The model as the answer engine `cfg.engine` needs it (qkv_core.engine.answering)."""
    return answer_engine(cfg.engine).load(cfg.runtime)


async def start_receiver(cfg: ServiceConfig, lm: LoadedModel) -> Running:
    metrics, auth = Metrics("receiver", lm.fingerprint.name), Auth(cfg.auth_tokens)
    engine = await asyncio.to_thread(ReceiverEngine.from_config, cfg, lm)
    metrics.intakes.set_function(lambda: engine.admission.intakes)
    metrics.intake_bytes.set_function(lambda: engine.admission.bytes)
    metrics.watch_store(engine.store)
    bulk = BulkServer(cfg) if cfg.bulk_port else None
    servicer = ReceiverServicer(engine, metrics, cfg, auth, bulk)
    store = engine.store
    tiers = ["hot", "memory", *(t.name for t in store.tiers)]
    # measured before the port opens: the device is otherwise idle now, and senders read it from the first Info
    measured = cfg.performance_tokens and engine.answers.measures_speed
    speed = await asyncio.to_thread(measure, engine, cfg.performance_tokens) if measured else None
    info = build_info("receiver", lm, cfg, [a.sender for a in engine.alignments.values()], tiers, speed,
                      whole_cards_only=engine.answers.whole_cards_only, bulk_port=bulk.port if bulk else 0)
    if speed:
        log.info("receiver speed: prefill %.0f tokens/s, first token %.0f ms, card decoding %.0f MB/s (fp16 KV)",
                 speed.prefill_tokens_per_s, speed.first_token_s * 1e3, speed.dequantize_bytes_per_s / 1e6)

    def refresh(reply: pb.InfoResponse, tenant: str) -> None:  # the caller's own cards: others' stay unseen
        reply.store_free_bytes = max(0, cfg.store.store_bytes - store.tenant_bytes(tenant))

    running = await start(
        "receiver", SERVICE, functools.partial(services_pb2_grpc.add_ReceiverServiceServicer_to_server, servicer),
        cfg, metrics,
        auth, InfoServicer(info, refresh, auth),
    )
    running.closers.append(engine.close)
    if bulk is not None:
        running.closers.append(bulk.close)
        log.info("bulk channel for card data on port %d%s", bulk.port, " (TLS)" if bulk.tls else "")
    await _report_tiers(running, engine)
    return running


async def _report_tiers(running: Running, engine: ReceiverEngine) -> None:
    """Each optional store tier as a health service of its own (qkvcomm.store.disk, qkvcomm.store.redis):
    NOT_SERVING while it is down. The receiver itself stays SERVING: it serves from its other tiers."""
    loop = asyncio.get_running_loop()

    def status(ok: bool) -> health_pb2.HealthCheckResponse.ServingStatus:
        return health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING

    for tier, ok in engine.store.stats.up.items():
        await running.health.set(f"qkvcomm.store.{tier}", status(ok))
    engine.store.stats.listeners.append(  # called from worker threads
        lambda tier, ok: asyncio.run_coroutine_threadsafe(
            running.health.set(f"qkvcomm.store.{tier}", status(ok)), loop))


async def main(cfg: ServiceConfig) -> None:
    lm = load_for(cfg)
    running = await start_receiver(cfg, lm)
    await serve_forever("receiver", running, cfg)
