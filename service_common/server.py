"""Run a grpc.aio server with health, reflection, /metrics, TLS and tokens (when configured) and
graceful shutdown."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from qkvcomm.v1 import services_pb2, services_pb2_grpc
from qkvcomm_client.channel import is_loopback_host

from qkv_core.config import MAX_CHUNK_BYTES, ServiceConfig
from qkv_core.engine.answering import answer_engine
from service_common.auth import Auth, AuthInterceptor
from service_common.info import InfoServicer
from service_common.logs import stats_lines
from service_common.metrics import Metrics
from service_common.tls import server_credentials

log = logging.getLogger(__name__)
T = TypeVar("T")

# A chunk carries up to 1 MiB of data; leave room for its framing fields.
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + (64 << 10)
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
# A server never shares its port: with gRPC's default SO_REUSEPORT a second server would bind the
# same port and the kernel would split calls between the two processes.
SERVER_OPTIONS = [*GRPC_OPTIONS, ("grpc.so_reuseport", 0)]
_FILES = ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens", "receiver_ca", "receiver_cert", "receiver_key")
INFO_SERVICE = services_pb2.DESCRIPTOR.services_by_name["InfoService"].full_name
READY = "ready"  # first word of the line a service prints once it listens


@dataclass
class Running:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    metrics_port: int
    stop_metrics: Callable[[], None]
    closers: list[Callable[[], None]] = field(default_factory=list)  # run last (a vLLM engine's processes)
    stats: asyncio.Task | None = None  # the periodic stats line

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING, let in-flight calls finish for up to grace_s, then close."""
        if self.stats is not None:
            self.stats.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        self.stop_metrics()
        for close in self.closers:
            await asyncio.to_thread(close)


async def start(
    name: str,
    full_service_name: str,
    add_servicer: Callable[[grpc.aio.Server], None],
    cfg: ServiceConfig,
    metrics: Metrics,
    auth: Auth,
    info: InfoServicer,
) -> Running:
    def denied(code: grpc.StatusCode) -> None:
        metrics.errors.labels(reason=code.name.lower()).inc()

    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[AuthInterceptor(auth, denied)])
    add_servicer(server)
    services_pb2_grpc.add_InfoServiceServicer_to_server(info, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (full_service_name, INFO_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )
    address = f"{cfg.host}:{cfg.port}"
    if cfg.tls_cert or cfg.tls_key:
        credentials = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        port = _bound(name, address, lambda a: server.add_secure_port(a, credentials))
    else:
        if cfg.tls_client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key: client certificates are checked over TLS")
        if not is_loopback_host(cfg.host):
            log.warning("%s listens on %s without TLS: anyone who can reach it reads the cards (contexts) it "
                        "carries; set --tls-cert and --tls-key", name, address)
        port = _bound(name, address, server.add_insecure_port)
    if port == 0:
        raise OSError(f"{name}: cannot listen on {address} (in use, or not an address of this host)")
    try:  # the metrics port first: a busy one refuses the start before the gRPC port opens
        http = metrics.serve(cfg.metrics_port, cfg.host) if cfg.metrics_port >= 0 else None
    except OSError as e:
        raise OSError(f"{name}: cannot serve /metrics on {cfg.host}:{cfg.metrics_port}: {e.strerror} "
                      "(--metrics-port; -1 turns it off)") from None
    await server.start()
    for service in ("", full_service_name):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    stats = None
    if cfg.stats_interval_s > 0:
        stats = asyncio.create_task(stats_lines(name, metrics.registry, cfg.stats_interval_s))
    if http is None:  # disabled
        return Running(server, health_servicer, port, -1, lambda: None, stats=stats)
    return Running(server, health_servicer, port, http.server_port, http.shutdown, stats=stats)


def _bound(name: str, address: str, add_port: Callable[[str], int]) -> int:
    """The port gRPC bound (0 when it could not); newer gRPC raises instead of returning 0."""
    try:
        return add_port(address)
    except RuntimeError:
        return 0


def preflight(role: str, cfg: ServiceConfig) -> None:
    """What a service can check before it loads a model, so a mistake costs a second, not a model
    load: required settings, readable files, free ports. ValueError or OSError naming the setting."""
    if role == "sender":
        require_receiver(cfg)
    else:
        answer_engine(cfg.engine).check(cfg)  # an unknown name, a missing package, a setting it lacks
    for setting in _FILES:
        path = getattr(cfg, setting)
        if path and not os.access(path, os.R_OK):
            flag = setting.replace("_", "-")
            raise OSError(f"--{flag} {path}: {'not readable' if os.path.exists(path) else 'no such file'}")
    for one, other in (("tls_cert", "tls_key"), ("receiver_cert", "receiver_key")):
        if bool(getattr(cfg, one)) != bool(getattr(cfg, other)):
            raise ValueError(f"--{one.replace('_', '-')} and --{other.replace('_', '-')} go together")
    for what, port in (("gRPC", cfg.port), ("metrics", cfg.metrics_port), ("bulk", cfg.bulk_port)):
        if port > 0:
            _free(cfg.host, port, what)


def require_receiver(cfg: ServiceConfig) -> None:
    """ValueError unless a sender's configuration names its receiver."""
    if not cfg.receiver:
        raise ValueError("the sender needs --receiver HOST:PORT (or QKVCOMM_RECEIVER)")


def _free(host: str, port: int, what: str) -> None:
    """OSError naming the port when something already listens there (bound without SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port} ({what} port): {e.strerror}") from None


async def serve_forever(name: str, running: Running, cfg: ServiceConfig) -> None:
    """Print the ready line, wait for SIGTERM/SIGINT, shut down gracefully, then end the process."""
    print(f"{READY} {name} grpc={cfg.host}:{running.port} metrics={running.metrics_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s: shutting down (grace %.1fs)", name, cfg.grace_s)
    await running.stop(cfg.grace_s)
    # The calls had their grace. A worker thread still inside a model call (a long prefill cannot be
    # interrupted) would keep the process alive: asyncio.run joins its executor's threads without
    # a timeout. End here, so SIGTERM always ends the process within the grace period.
    log.info("%s: stopped", name)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


async def iterate_in_thread(items: Iterator[T]) -> AsyncIterator[T]:
    """Drive a blocking iterator (model decoding) from the event loop, one item per thread hop."""
    done = object()
    while (item := await asyncio.to_thread(next, items, done)) is not done:
        yield item  # type: ignore[misc]
