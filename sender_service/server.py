"""The Sender gRPC service, a thin shell over qkv_core.engine.sender."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from qkvcomm.v1 import services_pb2, services_pb2_grpc
from qkvcomm_client import ClientTLS, call_metadata, check_token_transport, error_info, open_channel
from qkvcomm_client.channel import retry_config

from qkv_core.card.blocks import extendable
from qkv_core.card.framing import frames
from qkv_core.card.header import fingerprint_from_pb, model_details, text_card_id
from qkv_core.codec.registry import TEXT, codec_files
from qkv_core.config import ServiceConfig
from qkv_core.engine.selection import SelectionConfig
from qkv_core.engine.sender import Parent, PreparedCard, SenderEngine
from qkv_core.engine.sent import Sent, SentCards
from qkv_core.engine.sessions import Sessions
from qkv_core.errors import RequestError, Unsupported
from qkv_core.facts import FactConfig
from qkv_core.model.loaded import LoadedModel
from qkv_core.model.loading import load_model
from qkv_core.policy.auto import AUTO, AutoPolicy
from qkv_core.policy.decide import Receiver
from qkv_core.policy.estimates import PROBE_BYTES
from qkv_core.wire import pb, push_requests
from service_common.auth import Auth
from service_common.errors import guarded
from service_common.info import InfoServicer, build_info
from service_common.metrics import Metrics
from service_common.server import GRPC_OPTIONS, Running, require_receiver, serve_forever, start

log = logging.getLogger(__name__)
SERVICE = services_pb2.DESCRIPTOR.services_by_name["SenderService"].full_name
# The channel to the receiver: idempotent lookups (HasCard, Info) are retried on UNAVAILABLE (a
# receiver restarting), and reconnection backs off from 100 ms, not gRPC's default 1 s doubling to
# 120 s, so the first Ask after a receiver restart finds it. PushCard is a client stream, which gRPC
# does not retry; the sender pushes a card again itself after a broken stream (UNAVAILABLE), once:
# the card id is its content.
PUSH_ATTEMPTS = 2
INFO_TTL_S = 30.0  # how long the receiver's Info is trusted before the next handoff asks again
# parents any delta may extend: no coarser than the fp16 KV ratios are quoted against
LOSSLESS = (TEXT, "fp32", "fp16")


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


@dataclass(frozen=True)
class Upstream:
    """How one request calls the receiver: its deadline and metadata (the sender's token, the
    caller's tenant)."""

    timeout: float
    metadata: list[tuple[str, str]]
    tenant: str = ""

    def remaining(self, since: float) -> Upstream:
        return Upstream(max(0.0, self.timeout - (time.perf_counter() - since)), self.metadata, self.tenant)


class SenderServicer(services_pb2_grpc.SenderServiceServicer):
    def __init__(self, engine: SenderEngine, channel: grpc.aio.Channel, metrics: Metrics, cfg: ServiceConfig,
                 auth: Auth):
        self.engine = engine
        self.channel = channel
        self.receiver = services_pb2_grpc.ReceiverServiceStub(channel)
        self.receiver_meta = services_pb2_grpc.InfoServiceStub(channel)
        self.metrics = metrics
        self.cfg = cfg
        self.auth = auth
        self._receiver_info: tuple[float, pb.InfoResponse | None] | None = None  # (when fetched, what)
        self.fact_config = FactConfig(cfg.facts_method, cfg.facts_budget_bytes)  # a bad setting fails at start
        self._reprobe: asyncio.Task | None = None
        self.sessions = Sessions(cfg.session_bytes, cfg.session_max_per_tenant)
        self.sent = SentCards()
        self.auto = AutoPolicy(engine.lm.fingerprint, engine.profile, cfg.auto_codecs.split(","), cfg.max_quality_loss)
        metrics.watch_auto(self.auto)
        self.layers = SelectionConfig(cfg.layer_ratio, cfg.layer_method)  # a bad setting fails at start

    def _facts(self, asked: bool, codec: str) -> FactConfig | None:
        """The fact extraction a request gets: asked for, or on by the sender's configuration."""
        if codec == TEXT:
            if asked:
                raise RequestError("the text handoff carries the whole context; facts go with KV cards only")
            return None
        return self.fact_config if asked or self.cfg.facts else None

    def _layers(self, request: pb.ShareRequest | pb.AskRequest) -> SelectionConfig:
        if not request.layer_ratio and not request.layer_method:
            return self.layers
        return SelectionConfig(request.layer_ratio or self.layers.ratio, request.layer_method or self.layers.method)

    def _upstream(self, context: grpc.aio.ServicerContext) -> Upstream:
        """Calls to the receiver on this request's behalf: the deadline is the setting, or the
        client's remaining time if sooner; the tenant is the caller's."""
        remaining = context.time_remaining()
        limit = self.cfg.limits.receiver_timeout_s
        timeout = limit if remaining is None else max(0.0, min(limit, remaining))
        tenant = self.auth.tenant(context.invocation_metadata())
        return Upstream(timeout, call_metadata(self.cfg.receiver_token, tenant), tenant)

    async def _receiver_ready(self, up: Upstream) -> None:
        """Wait, within the request's deadline, for the channel to the receiver to connect: a receiver
        that is starting (or restarting) is waited for, not refused with the channel's last error
        while its reconnection backs off. If it never comes, the first call fails as it would."""
        if self.channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.channel.channel_ready(), up.timeout)

    async def _share(self, request: pb.ShareRequest | pb.AskRequest, up: Upstream) -> tuple[pb.HandoffStats, bool]:
        """The handoff's stats, and whether its card carries facts."""
        start = time.perf_counter()
        await self._receiver_ready(up)
        context, named = request.context, request.codec
        if request.session:
            context = self.sessions.context(up.tenant, request.session, context)
            named = named or self.sessions.codec(up.tenant, request.session)  # a session keeps its codec
        codec = named or self.cfg.codec
        layers = self._layers(request)
        auto = None
        if codec == AUTO:  # text only where the request can take it: no facts asked for, every layer
            codec, auto = await self._choose(context, up, text_ok=not request.facts and layers.ratio >= 1)
        facts = self._facts(request.facts, codec)
        if codec == TEXT and layers.ratio < 1:
            raise RequestError("the text handoff has no layers to select")
        stats = await (self._share_text(context, up) if codec == TEXT
                       else self._share_card(context, codec, facts, layers, up))
        if not stats.card_reused:
            m = self.metrics
            m.wire_bytes_sent.inc(stats.wire_bytes)
            m.observe("transfer", stats.transfer_s)
            self.auto.link.observe_transfer(stats.wire_bytes, stats.transfer_s)
            if codec != TEXT:  # the text baseline is no card: keep it out of the card statistics
                m.kv_fp16_bytes.inc(stats.kv_fp16_bytes)
                m.compression_ratio.observe(stats.compression_ratio)
        if codec != TEXT and stats.quantize_s > 0:  # a card held already was not encoded again
            self.auto.rates.observe(codec, stats.kv_fp16_bytes, stats.quantize_s)
        if auto is not None:
            stats.auto.CopyFrom(auto)
        if request.session:
            self.sessions.commit(up.tenant, request.session, context, request.context, named)
        stats.total_s = time.perf_counter() - start
        return stats, facts is not None

    async def _choose(self, context: str, up: Upstream, text_ok: bool) -> tuple[str, pb.AutoChoice]:
        """codec auto: the option with the lowest predicted time to first token (qkv_core.policy)."""
        info = await self.receiver_info(up)
        speed = info.performance if info is not None else None
        if speed is None or not speed.measured_tokens:
            raise Unsupported("codec auto needs the receiver's measured speed, and this receiver reports none "
                              "(its performance_tokens is 0): name a codec instead")
        start = time.perf_counter()
        if not self.auto.link.known:
            await self._probe(up)
        elif self.auto.link.stale() and (self._reprobe is None or self._reprobe.done()):
            self._reprobe = asyncio.create_task(self._probe(up, quiet=True))  # this request uses the estimate it has
        probe_s = time.perf_counter() - start
        start = time.perf_counter()
        tokens = len(self.engine.context_ids(context, up.tenant))
        receiver = Receiver(speed.prefill_tokens_per_s, speed.first_token_s, speed.dequantize_bytes_per_s)
        decision = await asyncio.to_thread(self.auto.choose, context, tokens, receiver, text_ok)
        decide_s = time.perf_counter() - start
        link = self.auto.link
        choice = pb.AutoChoice(
            options=[pb.AutoOption(codec=s.option.name, predicted_s=s.predicted_s, wire_bytes=s.option.wire_bytes,
                                   quality_loss=s.option.quality_loss, eligible=s.eligible) for s in decision.scored],
            predicted_s=decision.chosen.predicted_s, throughput_bytes_per_s=link.throughput.value,
            rtt_s=link.rtt_s.value,
            receiver_prefill_tokens_per_s=speed.prefill_tokens_per_s, max_quality_loss=self.auto.max_quality_loss,
            decide_s=decide_s, probe_s=probe_s if probe_s > 1e-3 else 0.0,
        )
        self.metrics.auto_choices.labels(decision.chosen.option.name).inc()
        return decision.chosen.option.name, choice

    async def _probe(self, up: Upstream, quiet: bool = False) -> None:
        """A link estimate: a round trip (Info), then PROBE_BYTES timed (InfoService.Probe). `quiet`:
        in the background, where a failure is logged (the next handoff measures the link anyway)."""
        try:
            start = time.perf_counter()
            await self.receiver_meta.Info(pb.InfoRequest(), timeout=up.timeout, metadata=up.metadata)
            self.auto.link.observe_rtt(time.perf_counter() - start)
            payload = os.urandom(PROBE_BYTES)
            start = time.perf_counter()
            await self.receiver_meta.Probe(pb.ProbeRequest(payload=payload), timeout=up.timeout, metadata=up.metadata)
            self.auto.link.observe_transfer(len(payload), time.perf_counter() - start, force=True)
        except grpc.aio.AioRpcError as e:
            if not quiet:
                raise
            log.warning("link probe failed (%s); the estimate stays as it was", e.code().name)

    async def receiver_info(self, up: Upstream) -> pb.InfoResponse | None:
        """The receiver's Info, fetched again after INFO_TTL_S; None from a receiver without the RPC."""
        now = time.monotonic()
        if self._receiver_info is None or now - self._receiver_info[0] > INFO_TTL_S:
            try:
                info = await self.receiver_meta.Info(pb.InfoRequest(), timeout=min(up.timeout, 10.0),
                                                     metadata=up.metadata)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                info = None
            self._receiver_info = (now, info)
        return self._receiver_info[1]

    async def check_receiver(self, up: Upstream) -> None:
        """FAILED_PRECONDITION, before any prefill, when the receiver cannot take this sender's cards:
        another model, and no alignment for this one."""
        info = await self.receiver_info(up)
        if info is None:
            return
        mine, theirs = self.engine.lm.fingerprint, fingerprint_from_pb(info.model)
        if not theirs.mismatch(mine) or any(fingerprint_from_pb(a) == mine for a in info.features.alignments):
            return
        raise Unsupported(f"this sender runs {mine.name!r} and its receiver {theirs.name!r} (they differ in "
                          f"{', '.join(theirs.mismatch(mine))}), and the receiver holds no alignment for this sender's "
                          "model: its cards would be refused", model_details(mine, theirs))

    async def _share_card(self, context: str, codec: str, facts: FactConfig | None, layers: SelectionConfig,
                          up: Upstream) -> pb.HandoffStats:
        """A card of the context: nothing when the receiver holds the card this request made last time;
        else a delta card when the receiver holds a prefix of the context, else the whole card."""
        await self.check_receiver(up)
        memo = self.sent.key(up.tenant, context, (codec, facts, layers))
        if (known := self.sent.get(memo)) is not None:
            if (await self._has_card(known.card_id, up)).present:
                return self._reused(known, codec)
            self.sent.forget(memo)
        parent = await self._find_parent(context, codec, layers, up)
        try:
            card = await self._prepare(context, codec, facts, layers, parent, up.tenant)
        except RequestError as e:  # the sender's own choice of a delta must not fail the request
            if parent is None:
                raise
            log.info("no delta card of %s on %s (%s); sending the whole card", codec, parent.card_id[:12], e)
            parent = None
            card = await self._prepare(context, codec, facts, layers, None, up.tenant)
        held = await self._has_card(card.header.card_id, up)
        reply, sent, transfer_s = None, 0, 0.0
        if not held.present:
            try:
                reply, sent, transfer_s = await self._push(card, up)
            except grpc.aio.AioRpcError as e:
                if parent is None or not _parent_missing(e):
                    raise
                log.info("the receiver no longer holds %s, which card %s extends; pushing the whole card",
                         parent.card_id[:12], card.header.card_id[:12])
                card = await self._prepare(context, codec, facts, layers, None, up.tenant)
                reply, sent, transfer_s = await self._push(card, up)
        header = card.header
        stats = pb.HandoffStats(
            card_id=header.card_id, codec=header.codec, context_tokens=header.context_tokens,
            kv_fp16_bytes=card.kv_fp16_bytes, kv_fp32_bytes=card.kv_fp32_bytes,
            prefill_s=card.prefill_s, quantize_s=card.quantize_s, facts_s=card.facts_s, facts=len(header.facts),
            card_reused=held.present, delta=bool(header.parent_card_id), parent_card_id=header.parent_card_id,
            reused_tokens=header.context_tokens if held.present else header.parent_tokens,
        )
        self.sent.add(memo, Sent(header.card_id, header.context_tokens, header.parent_card_id, header.parent_tokens))
        if reply is None:
            return stats
        stats.transfer_s, stats.dequantize_s = transfer_s, reply.dequantize_s
        _count_wire(stats, sent)
        m = self.metrics
        m.cards_sent.inc()
        m.card_tokens.labels("sent").inc(header.context_tokens - header.parent_tokens)
        if header.parent_card_id:
            m.delta_cards.inc()
            m.card_tokens.labels("reused").inc(header.parent_tokens)
            m.delta_saved_bytes.inc(sent * header.parent_tokens / (header.context_tokens - header.parent_tokens))
        return stats

    def _reused(self, known: Sent, codec: str) -> pb.HandoffStats:
        """The stats of a request whose card the receiver still holds: nothing was prefilled or sent."""
        fp, own = self.engine.lm.fingerprint, known.context_tokens - known.parent_tokens
        return pb.HandoffStats(
            card_id=known.card_id, codec=codec, context_tokens=known.context_tokens, kv_fp16_bytes=fp.kv_bytes(own, 2),
            kv_fp32_bytes=fp.kv_bytes(own, 4), card_reused=True, delta=bool(known.parent_card_id),
            parent_card_id=known.parent_card_id, reused_tokens=known.context_tokens,
        )

    async def _find_parent(self, context: str, codec: str, layers: SelectionConfig, up: Upstream) -> Parent | None:
        """The held prefix a delta card can extend (FindPrefix), if the receiver takes deltas and this
        card can be one."""
        info = await self.receiver_info(up)
        if (not self.cfg.delta_min_tokens or info is None or not info.features.sessions
                or not self.engine.can_extend(codec, layers, self.cfg.receiver_layers)):
            return None
        ids = self.engine.context_ids(context, up.tenant)
        hashes = self.engine.block_hashes(ids)
        if not hashes:
            return None
        parents = dict.fromkeys([codec, *LOSSLESS])  # a delta never rests on a coarser prefix than its own codec
        found = await self.receiver.FindPrefix(pb.FindPrefixRequest(block_hashes=hashes, codecs=parents),
                                               timeout=up.timeout, metadata=up.metadata)
        tokens = extendable(found.tokens, len(ids))
        return Parent(found.card_id, tokens) if found.card_id and tokens >= max(1, self.cfg.delta_min_tokens) else None

    async def _prepare(self, context: str, codec: str, facts: FactConfig | None, layers: SelectionConfig,
                       parent: Parent | None, tenant: str) -> PreparedCard:
        cancel = threading.Event()  # a client that goes away stops the prefill at its next chunk
        try:
            card = await asyncio.to_thread(
                self.engine.prepare, context, codec, facts, layers, self.cfg.receiver_layers, cancel, parent, tenant
            )
        except asyncio.CancelledError:
            cancel.set()
            raise
        self.metrics.observe("prefill", card.prefill_s)
        self.metrics.prompt_tokens.inc(card.header.context_tokens)
        self.metrics.observe("quantize", card.quantize_s)
        if facts:
            self.metrics.observe("facts", card.facts_s)
        return card

    async def _push(self, card: PreparedCard, up: Upstream) -> tuple[pb.PushCardResponse, int, float]:
        """PushCard: the receiver's reply, the bytes sent and the time it took."""
        sent = 0

        def counted() -> Iterator[pb.CardFrame]:
            nonlocal sent
            for frame in frames(card.header, card.blobs):
                sent += frame.ByteSize()
                yield frame

        t0 = time.perf_counter()
        for attempt in range(PUSH_ATTEMPTS):
            sent = 0
            try:
                left = up.remaining(since=t0)
                reply = await self.receiver.PushCard(push_requests(counted()), timeout=left.timeout,
                                                     metadata=left.metadata)
                break
            except grpc.aio.AioRpcError as e:  # a broken stream: push the card again, whole (its id is its content)
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == PUSH_ATTEMPTS - 1:
                    raise
                log.warning("card %s: the stream to the receiver broke (%s); pushing it again",
                            card.header.card_id[:12], e.details())
        return reply, sent, time.perf_counter() - t0

    async def _has_card(self, card_id: str, up: Upstream) -> pb.HasCardResponse:
        """HasCard, timed: a small call, so its time is the link's round trip (for codec auto)."""
        start = time.perf_counter()
        held = await self.receiver.HasCard(pb.HasCardRequest(card_id=card_id), timeout=up.timeout, metadata=up.metadata)
        self.auto.link.observe_rtt(time.perf_counter() - start)
        return held

    async def _share_text(self, context: str, up: Upstream) -> pb.HandoffStats:
        """The text baseline: the receiver prefills the context itself."""
        ids = self.engine.context_ids(context, up.tenant)
        fp = self.engine.lm.fingerprint
        stats = pb.HandoffStats(
            card_id=text_card_id(fp, ids), codec=TEXT, context_tokens=len(ids),
            kv_fp16_bytes=fp.kv_bytes(len(ids), 2), kv_fp32_bytes=fp.kv_bytes(len(ids), 4),
        )
        held = await self._has_card(stats.card_id, up)
        stats.card_reused = held.present
        if held.present:
            return stats
        request = pb.PushTextRequest(context=context)
        t0 = time.perf_counter()
        reply = await self.receiver.PushText(request, timeout=up.timeout, metadata=up.metadata)
        stats.transfer_s = time.perf_counter() - t0 - reply.prefill_s
        stats.prefill_s = reply.prefill_s
        stats.card_id = reply.card_id
        _count_wire(stats, request.ByteSize())
        return stats

    @guarded
    async def Share(self, request: pb.ShareRequest, context: grpc.aio.ServicerContext) -> pb.ShareResponse:
        stats, _ = await self._share(request, self._upstream(context))
        return pb.ShareResponse(stats=stats)

    @guarded
    async def Ask(self, request: pb.AskRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.AskResponse]:
        if not request.question.strip():
            raise RequestError("the question is empty")
        start = time.perf_counter()
        stats, facts = await self._share(request, self._upstream(context))
        query = pb.GenerateRequest(
            card_id=stats.card_id, query=request.question, max_new_tokens=request.max_new_tokens, facts=facts
        )
        up = self._upstream(context)
        first = True
        async for reply in self.receiver.Generate(query, timeout=up.timeout, metadata=up.metadata):
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


def _parent_missing(error: grpc.aio.AioRpcError) -> bool:
    """The receiver refused a delta card because it does not hold its parent (any more)."""
    info = error_info(error)
    return error.code() == grpc.StatusCode.FAILED_PRECONDITION and info is not None and info.reason == "PARENT_MISSING"


def _count_wire(stats: pb.HandoffStats, sent: int) -> None:
    stats.wire_bytes = sent
    stats.compression_ratio = stats.kv_fp16_bytes / sent
    stats.compression_ratio_fp32 = stats.kv_fp32_bytes / sent


def receiver_tls(cfg: ServiceConfig) -> ClientTLS:
    """How the sender reaches its receiver; PlaintextToken when its token would cross the network in clear."""
    tls = ClientTLS(cfg.receiver_ca, cfg.receiver_cert, cfg.receiver_key, cfg.receiver_server_name,
                    cfg.receiver_insecure)
    check_token_transport(cfg.receiver, tls, cfg.receiver_token)
    return tls


async def start_sender(cfg: ServiceConfig, lm: LoadedModel) -> tuple[Running, grpc.aio.Channel]:
    require_receiver(cfg)
    metrics, auth = Metrics("sender", lm.fingerprint.name), Auth(cfg.auth_tokens)
    channel = open_channel(cfg.receiver, receiver_tls(cfg), receiver_channel_options(cfg.receiver_balance), aio=True)
    files = codec_files([cfg.codec, *cfg.codec_files.split(",")])  # the configuration's files, no others
    engine = SenderEngine(lm, _path(cfg.codec_profile), _path(cfg.layer_profile), cfg.limits, files,
                          cfg.context_cache_bytes)
    servicer = SenderServicer(engine, channel, metrics, cfg, auth)
    running = await start(
        "sender", SERVICE, functools.partial(services_pb2_grpc.add_SenderServiceServicer_to_server, servicer),
        cfg, metrics, auth,
        InfoServicer(build_info("sender", lm, cfg)),
    )
    try:  # tell the operator now; every handoff checks again (cached), so a fixed receiver is picked up
        await servicer.check_receiver(Upstream(5.0, call_metadata(cfg.receiver_token, "")))
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
