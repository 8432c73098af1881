"""`qkvcomm bench transport`: how fast a card's bytes move between two processes, against what the
link itself carries, side by side in one run (issue 36's "measure first").

The same bytes (an fp16 card of `--tokens` tokens of the embedded model's shape, random KV) go
from this process to another process on loopback, by each path, interleaved over `--repeats`
rounds so drift in the machine's speed falls on every path alike:

    socket        a raw TCP socket: sendall from one buffer, recv_into one preallocated buffer.
                  The ceiling: what the link (here the loopback device) carries.
    socket+tls    the same through TLS (the dev CA, Python's ssl).
    grpc-bytes    a bare grpc.aio client stream of the card's frames as serialized bytes into a
                  server that only counts them: gRPC's own cost, no card checks.
    pushcard      today's PushCard into a receiver service: every frame parsed, CRC32C and the
                  content hash checked, each layer decoded while the next arrives.
    pushcard+tls  the same to a receiver that serves TLS.
    bulk          PushCardBulk: the header and a ticket over gRPC, the layers on the receiver's bulk
                  channel (recv_into per layer, the content hash checked, each layer decoded while
                  the next arrives; receiver_service/bulk.py).
    bulk+tls      the same with TLS on both (the bulk port speaks it with the gRPC port's certificate).

Reported per path: the median GB/s of the card's wire bytes (the time from the first byte sent to
the receiving side's reply), its ratio to the raw socket, and the CPU seconds per GB each side
spent (this process: `time.process_time`; the peer: its /proc/PID/stat). A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from qkvcomm.v1 import services_pb2_grpc
from qkvcomm_client import ClientTLS, open_channel
from tqdm import tqdm

from qkv_core.card.framing import frames
from qkv_core.card.header import CardPlan, build_card
from qkv_core.codec import registry
from qkv_core.config import RuntimeConfig
from qkv_core.model.loading import load_model
from qkv_core.types import KVCache
from qkv_core.wire import pb, push_requests
from qkv_eval.bench import machine
from qkvcomm_cli.launch import spawn
from sender_service.receiver_port import BulkRoute, send_bulk
from service_common.certs import DevCerts, make_dev_certs
from service_common.server import GRPC_OPTIONS

PATHS = ("socket", "socket+tls", "grpc-bytes", "pushcard", "pushcard+tls", "bulk", "bulk+tls")
SINK_METHOD = "/qkvcomm.bench.Sink/Push"
_ACK = struct.Struct("<Q")  # bytes received: the sink's reply once the last byte is in


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def socket_sink(host: str, nbytes: int, certs: str) -> None:
    """Accept connections forever; read `nbytes` from each into one preallocated buffer, then ack.
    Prints `ready PORT` once it listens (run as a process of its own: _start)."""
    buffer = memoryview(bytearray(nbytes))
    context = None
    if certs:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(Path(certs) / "server.crt", Path(certs) / "server.key")
    with socket.create_server((host, 0)) as server:
        print("ready", server.getsockname()[1], flush=True)
        while True:
            conn, _ = server.accept()
            if context is not None:
                conn = context.wrap_socket(conn, server_side=True)
            with conn:
                got = 0
                while got < nbytes:
                    n = conn.recv_into(buffer[got:], nbytes - got)
                    if not n:
                        break
                    got += n
                conn.sendall(_ACK.pack(got))


def grpc_sink(host: str) -> None:
    """A gRPC server with one client-streaming method that counts the bytes of what it is sent;
    prints `ready PORT` once it serves."""

    async def push(requests, context) -> bytes:  # noqa: ANN001 - generic handler
        got = 0
        async for message in requests:
            got += len(message)
        return _ACK.pack(got)

    async def serve() -> None:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        handler = grpc.method_handlers_generic_handler(
            "qkvcomm.bench.Sink", {"Push": grpc.stream_unary_rpc_method_handler(push)})
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port(f"{host}:0")
        await server.start()
        print("ready", port, flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())


@dataclass(frozen=True)
class Place:
    """Where the receiving side runs: behind `wrapper` (`ip netns exec NS`), listening on `host`."""

    wrapper: tuple[str, ...] = ()
    host: str = "127.0.0.1"


def _start(place: Place, call: str) -> tuple[subprocess.Popen, int]:
    """`python -c "from qkv_eval.bench_transport import *; CALL"` at `place`, and the port it prints."""
    code = f"from qkv_eval.bench_transport import *; {call}"
    process = subprocess.Popen([*place.wrapper, sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline().split()
    if line[:1] != ["ready"]:
        process.kill()
        raise RuntimeError(f"a sink at {place} did not start: {line}")
    return process, int(line[1])


@contextlib.contextmanager
def shaped_link(rate: str) -> Iterator[Place]:
    """A network namespace for the receiving side behind a veth pair whose end in this namespace is
    shaped to `rate` (tc syntax: 1gbit) by a token bucket; needs root. Removed afterwards."""
    ns = "qkvbench-rcv"

    def ip(*args: str, check: bool = True) -> None:
        subprocess.run(["ip", *args], check=check, capture_output=True)

    ip("netns", "del", ns, check=False)
    ip("netns", "add", ns)
    try:
        ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", "qkvb0", "type", "veth", "peer", "name", "qkvb1", "netns", ns)
        ip("addr", "add", "10.232.0.1/24", "dev", "qkvb0")
        ip("-n", ns, "addr", "add", "10.232.0.2/24", "dev", "qkvb1")
        ip("link", "set", "qkvb0", "up")
        ip("-n", ns, "link", "set", "qkvb1", "up")
        burst = max(64 << 10, _bits(rate) // 8 // 200)  # a token bucket of 5 ms at the rate, at least 64 KiB
        subprocess.run(["tc", "qdisc", "add", "dev", "qkvb0", "root", "tbf", "rate", rate, "burst", str(burst),
                        "latency", "50ms"], check=True, capture_output=True)
        yield Place(("ip", "netns", "exec", ns), "10.232.0.2")
    finally:
        ip("netns", "del", ns, check=False)  # takes the veth pair with it


def _bits(rate: str) -> int:
    """Bits per second of a tc rate: 1gbit, 500mbit."""
    units = {"gbit": 10**9, "mbit": 10**6, "kbit": 10**3, "bit": 1}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return int(float(rate[: -len(unit)]) * scale)
    raise SystemExit(f"bench transport: a link rate is like 1gbit or 500mbit, not {rate!r}")


def _card(tokens: int) -> tuple[pb.CardHeader, list[bytes]]:
    """An fp16 card of `tokens` tokens of the embedded model's shape (random KV: only its size matters)."""
    lm = load_model(RuntimeConfig(device="cpu"))
    fp = lm.fingerprint
    gen = torch.Generator().manual_seed(0)
    shape = (fp.num_kv_heads, tokens, fp.head_dim)
    kv = KVCache([torch.randn(shape, generator=gen).half() for _ in range(fp.num_layers)],
                 [torch.randn(shape, generator=gen).half() for _ in range(fp.num_layers)])
    ids = torch.randint(0, 1000, (tokens,), generator=gen).tolist()
    return build_card(fp, ids, kv, CardPlan("fp16", registry.resolve("fp16", fp.num_layers)))


class Peer:
    """The receiving side of one path: how to send it the card, and its process (for its CPU time)."""

    def __init__(self, pid: int, send: Callable[[], int], close: Callable[[], None]):
        self.pid, self.send, self.close = pid, send, close


def _socket_peer(payload: memoryview, certs: DevCerts | None, place: Place) -> Peer:
    directory = str(certs.directory) if certs else ""
    process, port = _start(place, f"socket_sink({place.host!r}, {len(payload)}, {directory!r})")
    context = ssl.create_default_context(cafile=str(certs.ca)) if certs else None

    def send() -> int:
        with socket.create_connection((place.host, port)) as raw:
            conn = context.wrap_socket(raw, server_hostname="localhost") if context else raw
            conn.sendall(payload)
            ack = b""
            while len(ack) < _ACK.size:
                ack += conn.recv(_ACK.size - len(ack))
            return _ACK.unpack(ack)[0]

    return Peer(process.pid, send, process.kill)


def _grpc_peer(messages: list[bytes], place: Place) -> Peer:
    process, port = _start(place, f"grpc_sink({place.host!r})")
    channel = grpc.insecure_channel(f"{place.host}:{port}", options=GRPC_OPTIONS)
    push = channel.stream_unary(SINK_METHOD, request_serializer=None, response_deserializer=None)

    def send() -> int:
        return _ACK.unpack(push(iter(messages), timeout=600))[0]

    def close() -> None:
        channel.close()
        process.kill()

    return Peer(process.pid, send, close)


def _receiver_peer(header: pb.CardHeader, blobs: list[bytes], certs: DevCerts | None, stack: ExitStack,
                   place: Place, bulk: bool = False) -> Peer:
    """A receiver service sized for the card (with its bulk channel, for `bulk`); each send pushes
    it whole (it validates and decodes it every time; the store keeps the first copy)."""
    big = ["--max-card-bytes", str(2 * header.payload_bytes + (64 << 20)), "--hot-bytes", "8Gi",
           "--max-inflight-bytes", "8Gi", "--performance-tokens", "0", "--device", "cpu"]
    tls = ["--tls-cert", str(certs.cert("server")), "--tls-key", str(certs.key("server"))] if certs else []
    receiver = spawn("receiver", *big, *tls, *(["--bulk-port", "-1"] if bulk else []), host=place.host,
                     wrapper=place.wrapper)
    stack.callback(receiver.stop)
    client_tls = ClientTLS(str(certs.ca)) if certs else ClientTLS()
    channel = open_channel(receiver.address, client_tls, GRPC_OPTIONS)
    stub = services_pb2_grpc.ReceiverServiceStub(channel)
    route = BulkRoute(place.host, client_tls)

    def send() -> int:
        if not bulk:
            return stub.PushCard(push_requests(frames(header, blobs)), timeout=600).wire_bytes
        call = stub.PushCardBulk(pb.PushCardBulkRequest(header=header), timeout=600)
        send_bulk(route, next(call).ticket, blobs, 600)
        return list(call)[-1].done.wire_bytes

    return Peer(receiver.process.pid, send, channel.close)


def run(args: argparse.Namespace) -> str:
    header, blobs = _card(args.tokens)
    messages = [f.SerializeToString() for f in frames(header, blobs)]
    wire = sum(len(m) for m in messages)
    payload = memoryview(b"".join(messages))
    paths = args.paths.split(",") if args.paths else list(PATHS)
    seconds: dict[str, list[float]] = defaultdict(list)
    cpu_here: dict[str, list[float]] = defaultdict(list)
    cpu_peer: dict[str, list[float]] = defaultdict(list)
    if args.link and any(p.endswith("+tls") for p in paths):
        raise SystemExit("bench transport: --link takes the plaintext paths (the dev certificates name loopback)")
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        certs = make_dev_certs(Path(tmp) / "certs")
        place = stack.enter_context(shaped_link(args.link)) if args.link else Place()
        peers = {}
        for path in paths:
            tls = certs if path.endswith("+tls") else None
            if path.startswith("socket"):
                peers[path] = _socket_peer(payload, tls, place)
            elif path == "grpc-bytes":
                peers[path] = _grpc_peer(messages, place)
            elif path.startswith(("pushcard", "bulk")):
                peers[path] = _receiver_peer(header, blobs, tls, stack, place, bulk=path.startswith("bulk"))
            else:
                raise SystemExit(f"bench transport: unknown path {path!r}; choose from {', '.join(PATHS)}")
            stack.callback(peers[path].close)
        for peer in peers.values():  # a first push each: connections made, buffers touched
            peer.send()
        for _ in tqdm(range(args.repeats), desc="bench transport", unit="round"):
            for path, peer in peers.items():
                here, there = time.process_time(), cpu_seconds(peer.pid)
                start = time.perf_counter()
                got = peer.send()
                seconds[path].append(time.perf_counter() - start)
                cpu_here[path].append(time.process_time() - here)
                cpu_peer[path].append(cpu_seconds(peer.pid) - there)
                if path.startswith("socket"):
                    short = got != len(payload)
                else:  # a receiver counts what it took: the frames, or the header and the layers (bulk)
                    short = got < (wire if path.startswith("pushcard") else header.payload_bytes)
                if short:
                    raise RuntimeError(f"{path}: the peer took {got} of {wire} bytes")
    return _table(args, wire, paths, seconds, cpu_here, cpu_peer)


def _table(args: argparse.Namespace, wire: int, paths: list[str], seconds: dict, cpu_here: dict, cpu_peer: dict) -> str:
    rate = {p: wire / statistics.median(seconds[p]) / 1e9 for p in paths}
    ceiling = rate.get("socket")
    where = f"a veth pair shaped to {args.link} (tbf) into a network namespace" if args.link else "loopback"
    link = f" --link {args.link}" if args.link else ""
    lines = [f"`qkvcomm bench transport --tokens {args.tokens} --repeats {args.repeats}{link}`: an fp16 card of "
             f"{args.tokens:,} tokens ({wire / 1e6:,.1f} MB on the wire), {where}, median of {args.repeats} "
             f"interleaved rounds; {machine()}, {os.cpu_count()} cores", "",
             "| path | GB/s | x raw socket | s (median) | CPU s/GB sender | CPU s/GB receiver |",
             "|---|---|---|---|---|---|"]
    for p in paths:
        ratio = f"{rate[p] / ceiling:.2f}" if ceiling else "-"
        lines.append(f"| {p} | {rate[p]:.2f} | {ratio} | {statistics.median(seconds[p]):.3f} | "
                     f"{statistics.median(cpu_here[p]) / wire * 1e9:.2f} | "
                     f"{statistics.median(cpu_peer[p]) / wire * 1e9:.2f} |")
    return "\n".join(lines)
