"""The sender's side of a handoff: one Share or Ask, from a context to a card (or the text) the
receiver holds, over a small port to the receiver.

Handoff.share, per request:

    1. the context: the request's, after the session's (a session keeps its context and codec)
    2. the codec: the request's, the session's or the configured one, parsed once here; `auto` asks
       the policy (qkv_core.policy.auto), after a link probe when the estimate is stale
    3. text: HasCard, then PushText unless held
    4. a card: nothing when the receiver holds the card this request made last time (the memo);
       else a delta card on the longest prefix the receiver holds (FindPrefix), else the whole
       card; a delta that cannot be made, or whose parent the receiver lost meanwhile, is sent
       whole; HasCard before PushCard, so a card is never sent twice
    5. the statistics (pb.HandoffStats), the session committed, the estimates updated

The port (ReceiverPort) is the receiver as this request reaches it: its deadline and credentials
are the port's, and so are retries and the wire; a port raises CardError(PARENT_MISSING) when the
receiver refuses a delta for want of its parent. sender_service adapts it to gRPC; a test can
implement it in memory.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Protocol

from qkv_core.card.blocks import extendable
from qkv_core.card.convert import fingerprint_from_pb, model_details
from qkv_core.card.naming import text_card_id
from qkv_core.codec.registry import TEXT, Codec
from qkv_core.config import ServiceConfig
from qkv_core.engine.selection import SelectionConfig
from qkv_core.engine.sender import Parent, PreparedCard, SenderEngine
from qkv_core.engine.sent import Sent, SentCards
from qkv_core.engine.sessions import Sessions
from qkv_core.errors import CardError, ErrorKind, RequestError, Unsupported
from qkv_core.facts import FactConfig
from qkv_core.policy.auto import AUTO, AutoPolicy
from qkv_core.policy.decide import Receiver
from qkv_core.policy.estimates import PROBE_BYTES
from qkv_core.wire import pb

log = logging.getLogger(__name__)
INFO_TTL_S = 30.0  # how long the receiver's Info is trusted before the next handoff asks again
# parents any delta may extend: no coarser than the fp16 KV ratios are quoted against
LOSSLESS = (TEXT, "fp32", "fp16")


class ReceiverPort(Protocol):
    """The receiver as one request reaches it (module docstring)."""

    async def ready(self) -> None:
        """Wait, within the request's deadline, for the receiver to be reachable."""

    async def info(self) -> pb.InfoResponse | None:
        """Its Info; None from a receiver without the RPC."""

    async def probe(self, payload: bytes) -> None:
        """Send `payload` and wait for the reply (a link measurement)."""

    async def has_card(self, card_id: str) -> bool: ...

    async def find_prefix(self, hashes: list[bytes], codecs: list[str]) -> pb.FindPrefixResponse: ...

    async def push_card(self, header: pb.CardHeader, blobs: list[bytes],
                        bulk: bool) -> tuple[pb.PushCardResponse, int]:
        """Send the card (its layer blobs: qkv_core.card.framing frames them), on the receiver's bulk
        channel when `bulk` (its Info offers one and the sender's configuration allows it); the reply
        and the bytes sent. CardError(PARENT_MISSING) when the receiver does not hold a delta's parent."""

    async def push_text(self, request: pb.PushTextRequest) -> pb.PushTextResponse: ...


class Handoff:
    """The handoffs of one sender (module docstring): its engine, sessions, memo of sent cards,
    codec auto policy and the receiver's Info, shared by every request."""

    def __init__(self, engine: SenderEngine, cfg: ServiceConfig):
        self.engine, self.cfg = engine, cfg
        self.fact_config = FactConfig(cfg.facts_method, cfg.facts_budget_bytes)  # a bad setting fails at start
        self.layers = SelectionConfig(cfg.layer_ratio, cfg.layer_method)
        self.sessions = Sessions(cfg.session_bytes, cfg.session_max_per_tenant)
        self.sent = SentCards()
        self.auto = AutoPolicy(engine.lm.fingerprint, engine.profile, cfg.auto_codecs.split(","), cfg.max_quality_loss)
        self._receiver_info: tuple[float, pb.InfoResponse | None] | None = None  # (when fetched, what)
        self._reprobe: asyncio.Task | None = None

    async def share(self, request: pb.ShareRequest | pb.AskRequest, port: ReceiverPort,
                    tenant: str) -> tuple[pb.HandoffStats, bool]:
        """The handoff's stats, and whether its card carries facts."""
        start = time.perf_counter()
        await port.ready()
        context, named = request.context, request.codec
        if request.session:
            context = self.sessions.context(tenant, request.session, context)
            named = named or self.sessions.codec(tenant, request.session)  # a session keeps its codec
        name = named or self.cfg.codec
        layers = self._layers(request)
        auto = None
        if name == AUTO:  # text only where the request can take it: no facts asked for, every layer
            text_ok = not request.facts and layers.ratio >= 1
            name, auto = await self._choose(context, port, tenant, layers, text_ok)
        if name == TEXT:
            if request.facts:
                raise RequestError("the text handoff carries the whole context; facts go with KV cards only")
            if layers.ratio < 1:
                raise RequestError("the text handoff has no layers to select")
            facts, stats = None, await self._share_text(context, port, tenant)
        else:
            codec = self.engine.codec(name)
            facts = self.fact_config if request.facts or self.cfg.facts else None
            stats = await self._share_card(context, codec, facts, layers, port, tenant)
            if stats.quantize_s > 0:  # a card held already was not encoded again
                self.auto.rates.observe(name, stats.kv_fp16_bytes, stats.quantize_s)
        if not stats.card_reused:
            self.auto.link.observe_transfer(stats.wire_bytes, stats.transfer_s)
        if auto is not None:
            stats.auto.CopyFrom(auto)
        if request.session:
            self.sessions.commit(tenant, request.session, context, request.context, named)
        stats.total_s = time.perf_counter() - start
        return stats, facts is not None

    def _layers(self, request: pb.ShareRequest | pb.AskRequest) -> SelectionConfig:
        if not request.layer_ratio and not request.layer_method:
            return self.layers
        return SelectionConfig(request.layer_ratio or self.layers.ratio, request.layer_method or self.layers.method)

    async def _choose(self, context: str, port: ReceiverPort, tenant: str, layers: SelectionConfig,
                      text_ok: bool) -> tuple[str, pb.AutoChoice]:
        """codec auto: the option with the lowest predicted time to first token (qkv_core.policy),
        a card predicted as the delta it would be when the receiver holds a prefix of the context."""
        info = await self.receiver_info(port)
        speed = info.performance if info is not None else None
        if speed is None or not speed.measured_tokens:
            raise Unsupported("codec auto needs the receiver's measured speed, and this receiver reports none "
                              "(its performance_tokens is 0): name a codec instead")
        start = time.perf_counter()
        if not self.auto.link.known:
            await self._probe(port)
        elif self.auto.link.stale() and (self._reprobe is None or self._reprobe.done()):
            self._reprobe = asyncio.create_task(self._probe(port, quiet=True))  # this request uses the estimate
        probe_s = time.perf_counter() - start
        start = time.perf_counter()
        tokens = len(self.engine.context_ids(context, tenant))
        receiver = Receiver(speed.prefill_tokens_per_s, speed.first_token_s, speed.dequantize_bytes_per_s)
        cards = [codec for codec in self.auto.candidates.values() if codec is not None]  # parsed at start
        held = await asyncio.gather(*(self._find_parent(context, codec, layers, port, tenant)
                                      for codec in cards))  # concurrent: one round trip
        reused = {codec.name: parent.tokens for codec, parent in zip(cards, held) if parent is not None}
        decision = await asyncio.to_thread(self.auto.choose, context, tokens, receiver, text_ok, reused)
        link = self.auto.link
        choice = pb.AutoChoice(
            options=[pb.AutoOption(codec=s.option.name, predicted_s=s.predicted_s, wire_bytes=s.option.wire_bytes,
                                   quality_loss=s.option.quality_loss, eligible=s.eligible,
                                   reused_tokens=s.option.reused_tokens) for s in decision.scored],
            predicted_s=decision.chosen.predicted_s, throughput_bytes_per_s=link.throughput.value,
            rtt_s=link.rtt_s.value, receiver_prefill_tokens_per_s=speed.prefill_tokens_per_s,
            max_quality_loss=self.auto.max_quality_loss, decide_s=time.perf_counter() - start,
            probe_s=probe_s if probe_s > 1e-3 else 0.0,
        )
        return decision.chosen.option.name, choice

    async def _probe(self, port: ReceiverPort, quiet: bool = False) -> None:
        """A link estimate: a round trip (Info), then PROBE_BYTES timed. `quiet`: in the background,
        where a failure is logged (the next handoff measures the link anyway)."""
        try:
            start = time.perf_counter()
            await port.info()
            self.auto.link.observe_rtt(time.perf_counter() - start)
            payload = os.urandom(PROBE_BYTES)
            start = time.perf_counter()
            await port.probe(payload)
            self.auto.link.observe_transfer(len(payload), time.perf_counter() - start, force=True)
        except Exception as e:
            if not quiet:
                raise
            log.warning("link probe failed (%s); the estimate stays as it was", e)

    async def receiver_info(self, port: ReceiverPort) -> pb.InfoResponse | None:
        """The receiver's Info, fetched again after INFO_TTL_S; None from a receiver without the RPC."""
        now = time.monotonic()
        if self._receiver_info is None or now - self._receiver_info[0] > INFO_TTL_S:
            self._receiver_info = (now, await port.info())
        return self._receiver_info[1]

    async def check_receiver(self, port: ReceiverPort) -> None:
        """FAILED_PRECONDITION, before any prefill, when the receiver cannot take this sender's cards:
        another model, and no alignment for this one."""
        info = await self.receiver_info(port)
        if info is None:
            return
        mine, theirs = self.engine.lm.fingerprint, fingerprint_from_pb(info.model)
        if not theirs.mismatch(mine) or any(fingerprint_from_pb(a) == mine for a in info.features.alignments):
            return
        raise Unsupported(f"this sender runs {mine.name!r} and its receiver {theirs.name!r} (they differ in "
                          f"{', '.join(theirs.mismatch(mine))}), and the receiver holds no alignment for this sender's "
                          "model: its cards would be refused", model_details(mine, theirs))

    async def _share_card(self, context: str, codec: Codec, facts: FactConfig | None, layers: SelectionConfig,
                          port: ReceiverPort, tenant: str) -> pb.HandoffStats:
        """A card of the context: nothing when the receiver holds the card this request made last time;
        else a delta card when the receiver holds a prefix of the context, else the whole card."""
        await self.check_receiver(port)
        memo = self.sent.key(tenant, context, (codec.name, facts, layers))
        if (known := self.sent.get(memo)) is not None:
            if await self._has_card(known.card_id, port):
                return self._reused(known, codec.name)
            self.sent.forget(memo)
        parent = await self._find_parent(context, codec, layers, port, tenant)
        try:
            card = await self._prepare(context, codec, facts, layers, parent, tenant)
        except RequestError as e:  # the sender's own choice of a delta must not fail the request
            if parent is None:
                raise
            log.info("no delta card of %s on %s (%s); sending the whole card", codec.name, parent.card_id[:12], e)
            parent = None
            card = await self._prepare(context, codec, facts, layers, None, tenant)
        held = await self._has_card(card.header.card_id, port)
        reply, sent, transfer_s = None, 0, 0.0
        if not held:
            try:
                reply, sent, transfer_s = await self._push(card, port)
            except CardError as e:
                if parent is None or e.kind != ErrorKind.PARENT_MISSING:
                    raise
                log.info("the receiver no longer holds %s, which card %s extends; pushing the whole card",
                         parent.card_id[:12], card.header.card_id[:12])
                card = await self._prepare(context, codec, facts, layers, None, tenant)
                reply, sent, transfer_s = await self._push(card, port)
        header = card.header
        stats = pb.HandoffStats(
            card_id=header.card_id, codec=header.codec, context_tokens=header.context_tokens,
            kv_fp16_bytes=card.kv_fp16_bytes, kv_fp32_bytes=card.kv_fp32_bytes,
            prefill_s=card.prefill_s, quantize_s=card.quantize_s, facts_s=card.facts_s, facts=len(header.facts),
            card_reused=held, delta=bool(header.parent_card_id), parent_card_id=header.parent_card_id,
            reused_tokens=header.context_tokens if held else header.parent_tokens,
        )
        self.sent.add(memo, Sent(header.card_id, header.context_tokens, header.parent_card_id, header.parent_tokens))
        if reply is not None:
            stats.transfer_s, stats.dequantize_s = transfer_s, reply.dequantize_s
            count_wire(stats, sent)
        return stats

    def _reused(self, known: Sent, codec: str) -> pb.HandoffStats:
        """The stats of a request whose card the receiver still holds: nothing was prefilled or sent."""
        fp, own = self.engine.lm.fingerprint, known.context_tokens - known.parent_tokens
        return pb.HandoffStats(
            card_id=known.card_id, codec=codec, context_tokens=known.context_tokens, kv_fp16_bytes=fp.kv_bytes(own, 2),
            kv_fp32_bytes=fp.kv_bytes(own, 4), card_reused=True, delta=bool(known.parent_card_id),
            parent_card_id=known.parent_card_id, reused_tokens=known.context_tokens,
        )

    async def _find_parent(self, context: str, codec: Codec, layers: SelectionConfig, port: ReceiverPort,
                           tenant: str) -> Parent | None:
        """The held prefix a delta card can extend (FindPrefix), if the receiver takes deltas and this
        card can be one."""
        info = await self.receiver_info(port)
        if (not self.cfg.delta_min_tokens or info is None or not info.features.sessions
                or not self.engine.can_extend(codec, layers, self.cfg.receiver_layers)):
            return None
        ids = self.engine.context_ids(context, tenant)
        hashes = self.engine.block_hashes(ids)
        if not hashes:
            return None
        parents = list(dict.fromkeys([codec.name, *LOSSLESS]))  # a delta never rests on a coarser prefix than its own
        found = await port.find_prefix(hashes, parents)
        tokens = extendable(found.tokens, len(ids))
        return Parent(found.card_id, tokens) if found.card_id and tokens >= max(1, self.cfg.delta_min_tokens) else None

    async def _prepare(self, context: str, codec: Codec, facts: FactConfig | None, layers: SelectionConfig,
                       parent: Parent | None, tenant: str) -> PreparedCard:
        cancel = threading.Event()  # a client that goes away stops the prefill at its next chunk
        try:
            return await asyncio.to_thread(
                self.engine.prepare, context, codec, facts, layers, self.cfg.receiver_layers, cancel, parent, tenant
            )
        except asyncio.CancelledError:
            cancel.set()
            raise

    async def _push(self, card: PreparedCard, port: ReceiverPort) -> tuple[pb.PushCardResponse, int, float]:
        """The receiver's reply, the bytes sent (the last attempt's) and the time it took."""
        info = await self.receiver_info(port)
        bulk = self.cfg.receiver_bulk and info is not None and info.features.bulk_port > 0
        start = time.perf_counter()
        reply, sent = await port.push_card(card.header, card.blobs, bulk)
        return reply, sent, time.perf_counter() - start

    async def _has_card(self, card_id: str, port: ReceiverPort) -> bool:
        """HasCard, timed: a small call, so its time is the link's round trip (for codec auto)."""
        start = time.perf_counter()
        held = await port.has_card(card_id)
        self.auto.link.observe_rtt(time.perf_counter() - start)
        return held

    async def _share_text(self, context: str, port: ReceiverPort, tenant: str) -> pb.HandoffStats:
        """The text baseline: the receiver prefills the context itself."""
        ids = self.engine.context_ids(context, tenant)
        fp = self.engine.lm.fingerprint
        stats = pb.HandoffStats(
            card_id=text_card_id(fp, ids), codec=TEXT, context_tokens=len(ids),
            kv_fp16_bytes=fp.kv_bytes(len(ids), 2), kv_fp32_bytes=fp.kv_bytes(len(ids), 4),
        )
        stats.card_reused = await self._has_card(stats.card_id, port)
        if stats.card_reused:
            return stats
        request = pb.PushTextRequest(context=context)
        start = time.perf_counter()
        reply = await port.push_text(request)
        stats.transfer_s = time.perf_counter() - start - reply.prefill_s
        stats.prefill_s = reply.prefill_s
        stats.card_id = reply.card_id
        count_wire(stats, request.ByteSize())
        return stats


def count_wire(stats: pb.HandoffStats, sent: int) -> None:
    stats.wire_bytes = sent
    stats.compression_ratio = stats.kv_fp16_bytes / sent
    stats.compression_ratio_fp32 = stats.kv_fp32_bytes / sent
