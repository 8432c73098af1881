"""Prometheus metrics of one service, in its own registry (two services can share a process).

Names follow Prometheus conventions: base units (bytes, seconds), `_total` for counters. Each
service registers its own series only (a sender has no store, a receiver sends no cards), with
the process and platform collectors beside them and no `_created` series. The endpoint answers
at /metrics only; any other path is 404.
"""
from __future__ import annotations

import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from qkv_core.codec.registry import TEXT
from qkv_core.policy.auto import AutoPolicy
from qkv_core.store.tiered import CardStore
from qkv_core.wire import pb

disable_created_metrics()  # a `_created` twin of every counter and histogram is noise on a dashboard
STAGES = ("prefill", "quantize", "facts", "transfer", "dequantize", "generate")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_RATIO_BUCKETS = (1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)


class Metrics:
    def __init__(self, service: str, model_name: str = ""):
        self.registry = CollectorRegistry()
        r = self.registry
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # process_*, python_*
            r.register(collector)
        self.model_name = model_name
        # As serving engines export them (vLLM's set is the reference): per request, with the model.
        Gauge("qkvcomm_model_info", "The model this service runs (value 1)", ["model_name", "role"],
              registry=r).labels(model_name, service).set(1)
        self.requests = Counter("qkvcomm_requests_total", "RPCs served, by method and final status",
                                ["model_name", "method", "status"], registry=r)
        self.in_flight = Gauge("qkvcomm_requests_in_flight", "RPCs being served now", ["model_name", "method"],
                               registry=r)
        self.prompt_tokens = Counter("qkvcomm_prompt_tokens_total", "Context tokens prefilled (sender: into cards; "
                                     "receiver: text handoffs)", ["model_name"], registry=r).labels(model_name)
        # Time to first token, each service its own series: the receiver's from Generate to the first token,
        # the sender's from Ask to the first token (the handoff included): nothing counted twice.
        if service == "receiver":
            self.generation_tokens = Counter("qkvcomm_generation_tokens_total", "Tokens generated", ["model_name"],
                                             registry=r).labels(model_name)
            self.cached_tokens = Counter("qkvcomm_generation_cached_tokens_total", "Prompt tokens a Generate took "
                                         "from its card instead of computing them (the vLLM engine: those it loaded)",
                                         ["model_name"], registry=r).labels(model_name)
            self.ttft = Histogram("qkvcomm_time_to_first_token_seconds", "Generate call to its first token",
                                  ["model_name"], buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        else:
            self.ask_ttft = Histogram("qkvcomm_ask_time_to_first_token_seconds", "Ask call to its first token "
                                      "(prefill, handoff and the receiver's first token)", ["model_name"],
                                      buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
            self.auto_choices = Counter("qkvcomm_auto_choices_total", "What codec auto chose, by option", ["codec"],
                                        registry=r)
        self.delta_cards = Counter("qkvcomm_delta_cards_total", "Delta cards sent (sender) or accepted (receiver): "
                                   "only the tokens after a held prefix", registry=r)
        self.card_tokens = Counter("qkvcomm_card_tokens_total", "Context tokens of the cards, by part: sent (in the "
                                   "card) or reused (a held prefix a delta extends)", ["part"], registry=r)
        self.stage_seconds = Histogram(
            "qkvcomm_stage_seconds", "Latency of one pipeline stage", ["stage"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.errors = Counter("qkvcomm_errors_total", "Requests refused or failed, by reason", ["reason"], registry=r)
        if service == "receiver":
            self.wire_bytes_received = Counter(
                "qkvcomm_wire_bytes_received_total", "Card bytes received (serialized frames)", registry=r
            )
            self.cards_received = Counter("qkvcomm_cards_received_total", "Cards accepted", registry=r)
            self.cards_held = Gauge("qkvcomm_cards_held", "Cards the receiver holds in RAM (memory and hot tiers)",
                                    registry=r)
            self.store_bytes = Gauge("qkvcomm_store_bytes", "Bytes the receiver's store holds in RAM (memory and hot "
                                     "tiers)", registry=r)
            self.intakes = Gauge("qkvcomm_intakes_in_flight", "Cards arriving now", registry=r)
            self.intake_bytes = Gauge(
                "qkvcomm_intake_bytes_in_flight", "Decoded bytes admitted for the cards arriving now", registry=r
            )
        else:
            self.wire_bytes_sent = Counter("qkvcomm_wire_bytes_sent_total", "Card bytes sent (serialized frames)",
                                           registry=r)
            self.cards_sent = Counter("qkvcomm_cards_sent_total", "Cards pushed to a receiver", registry=r)
            self.delta_saved_bytes = Counter("qkvcomm_delta_saved_bytes_total", "Wire bytes the delta cards saved: "
                                             "the reused tokens at the bytes per token of the delta itself", registry=r)
            self.kv_fp16_bytes = Counter(
                "qkvcomm_kv_fp16_bytes_total", "fp16 size of all layers of the KV the cards stand for", registry=r
            )
            self.compression_ratio = Histogram(
                "qkvcomm_compression_ratio", "fp16 KV bytes of all layers / card bytes on the wire",
                buckets=_RATIO_BUCKETS, registry=r,
            )
        self.service = service

    def watch_store(self, store: CardStore) -> None:
        """Export the receiver's store: RAM totals, and per tier its bytes, cards, events and health."""
        self.cards_held.set_function(lambda: len(store))
        self.store_bytes.set_function(lambda: store.nbytes)
        self.registry.register(_StoreCollector(store))

    def watch_auto(self, auto: AutoPolicy) -> None:
        """Export the inputs of codec auto's prediction: the link estimate (NaN until measured)."""
        value = lambda ewma: ewma.value if ewma.value is not None else float("nan")  # noqa: E731
        Gauge("qkvcomm_link_throughput_bytes_per_second", "Sender to receiver throughput (EWMA of transfers)",
              registry=self.registry).set_function(lambda: value(auto.link.throughput))
        Gauge("qkvcomm_link_rtt_seconds", "Sender to receiver round trip (EWMA of small calls)",
              registry=self.registry).set_function(lambda: value(auto.link.rtt_s))
        Gauge("qkvcomm_receiver_prefill_tokens_per_second", "The receiver's prefill rate, as its Info reports it",
              registry=self.registry).set_function(
                  lambda: auto.receiver.prefill_tokens_per_s if auto.receiver else float("nan"))

    def observe(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage=stage).observe(seconds)

    def record_handoff(self, stats: pb.HandoffStats) -> None:
        """A sender's handoff (qkv_core.engine.handoff), from its statistics."""
        if stats.HasField("auto"):
            self.auto_choices.labels(stats.codec).inc()
        card = stats.codec != TEXT
        if card and stats.quantize_s > 0:  # prepared here, not answered from the memo of sent cards
            self.observe("prefill", stats.prefill_s)
            self.prompt_tokens.inc(stats.context_tokens)
            self.observe("quantize", stats.quantize_s)
            if stats.facts_s:
                self.observe("facts", stats.facts_s)
        if stats.card_reused:
            return
        self.wire_bytes_sent.inc(stats.wire_bytes)
        self.observe("transfer", stats.transfer_s)
        if not card:  # the text baseline is no card: kept out of the card statistics
            return
        self.kv_fp16_bytes.inc(stats.kv_fp16_bytes)
        self.compression_ratio.observe(stats.compression_ratio)
        self.cards_sent.inc()
        own = stats.context_tokens - stats.reused_tokens
        self.card_tokens.labels("sent").inc(own)
        if stats.delta:
            self.delta_cards.inc()
            self.card_tokens.labels("reused").inc(stats.reused_tokens)
            self.delta_saved_bytes.inc(stats.wire_bytes * stats.reused_tokens / own)

    def serve(self, port: int, host: str = "0.0.0.0") -> WSGIServer:
        """Start the /metrics HTTP endpoint in a thread; `.server_port` is the bound port."""
        metrics = make_wsgi_app(self.registry)

        def app(environ: dict, start_response):  # noqa: ANN202 - WSGI
            if environ.get("PATH_INFO", "") in ("/metrics", "/metrics/"):
                return metrics(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: the metrics are at /metrics\n"]

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
        server: WSGIServer = make_server(host.strip("[]"), port, app, server_class, _Quiet)
        threading.Thread(target=server.serve_forever, daemon=True, name=f"metrics-{self.service}").start()
        return server


class _Quiet(WSGIRequestHandler):
    """No access line on stderr per scrape."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


class _StoreCollector(Collector):
    """The store's own counters (qkv_core.store.stats), read at each scrape."""

    def __init__(self, store: CardStore):
        self.store = store

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        store = self.store
        events = CounterMetricFamily("qkvcomm_store_events", "Card store events by tier: hit, miss, write, spill, "
                                     "evict, reload, corrupt, reencode, orphan, error", labels=["tier", "event"])
        for (tier, event), n in sorted(store.stats.snapshot().items()):
            events.add_metric([tier, event], n)
        yield events
        sizes = GaugeMetricFamily("qkvcomm_store_tier_bytes", "Bytes held per store tier", labels=["tier"])
        cards = GaugeMetricFamily("qkvcomm_store_tier_cards", "Cards held per store tier", labels=["tier"])
        held = [("hot", (store.hot.nbytes, len(store.hot))), ("memory", (store.memory.nbytes, len(store.memory))),
                *((t.name, t.held()) for t in store.tiers)]
        for tier, counted in held:
            if counted is None:  # a tier that cannot count cheaply (Redis, shared by every receiver)
                continue
            nbytes, count = counted
            sizes.add_metric([tier], nbytes)
            cards.add_metric([tier], count)
        yield sizes
        yield cards
        up = GaugeMetricFamily("qkvcomm_store_tier_up", "1 while an optional store tier (disk, redis) works",
                               labels=["tier"])
        for tier, ok in store.stats.up.items():
            up.add_metric([tier], 1.0 if ok else 0.0)
        yield up
