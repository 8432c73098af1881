"""`qkvcomm bench tls`: what transport security costs a handoff, side by side in one run.

Three pairs of real service processes on loopback, all with the same model:
    plaintext  no TLS, no tokens (`make run`)
    tls        the sender serves TLS and checks tokens; plaintext to the receiver
    mtls       as deployed: TLS + token to the sender, mutual TLS + relay token to the receiver
Every row's question goes to each pair in turn (interleaved, so drift in the machine's speed
hits all three alike), with a one-token answer so the handoff dominates. Reported per codec and
mode: the median of the client's latency (a new channel per call, so a TLS handshake included)
and of the sender's transfer time to the receiver (HasCard + PushCard on its long-lived channel),
and their ratios to plaintext. Then, on the mtls receiver, `HasCard` timed for another tenant's
card against an absent one (and the owner's own, for scale), interleaved: tenants must not learn
what others hold from the time a lookup takes.
"""
from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from qkvcomm.v1 import services_pb2_grpc
from qkvcomm_client import ClientTLS, SenderClient, call_metadata, open_channel
from tqdm import tqdm

from qkv_core.wire import pb
from qkv_eval.bench import machine
from qkv_eval.evaluate import load_rows
from qkvcomm_cli.launch import Child, spawn
from service_common.certs import DevCerts, make_dev_certs
from service_common.server import GRPC_OPTIONS

MODES = ("plaintext", "tls", "mtls")
CODECS = ("int8", "kivi-4", "fp16")
TOKEN = "bench-client-token"
RELAY = "bench-relay-token"


@contextmanager
def _pair(mode: str, certs: DevCerts, runtime: list[str]) -> Iterator[tuple[Child, Child, ClientTLS, str]]:
    """A receiver and a sender in `mode`; yields both, how to reach the sender and the token to send."""
    server = ["--tls-cert", str(certs.cert("server")), "--tls-key", str(certs.key("server"))]
    tokens = ["--auth-tokens", str(certs.directory / "tokens")]
    receiver_args = {"plaintext": [], "tls": [], "mtls": [*server, "--tls-client-ca", str(certs.ca), *tokens]}[mode]
    sender_args = {"plaintext": [], "tls": [*server, *tokens],
                   "mtls": [*server, *tokens, "--receiver-ca", str(certs.ca),
                            "--receiver-cert", str(certs.cert("client")),
                            "--receiver-key", str(certs.key("client"))]}[mode]
    env = {"QKVCOMM_RECEIVER_TOKEN": RELAY} if mode == "mtls" else {}  # a secret: not on the command line
    with ExitStack() as stack:
        receiver = spawn("receiver", *runtime, *receiver_args)
        stack.callback(receiver.stop)
        sender = spawn("sender", "--receiver", receiver.address, *runtime, *sender_args, env=env)
        stack.callback(sender.stop)
        secure = mode != "plaintext"
        yield receiver, sender, ClientTLS(str(certs.ca)) if secure else ClientTLS(), TOKEN if secure else ""


def run(args: argparse.Namespace) -> str:
    rows = list(load_rows(args.data, args.limit))
    codecs = args.codecs.split(",") if args.codecs else list(CODECS)
    runtime = [f"--model={args.model}", "--device=cpu"]
    client: dict[tuple[str, str], list[float]] = defaultdict(list)
    transfer: dict[tuple[str, str], list[float]] = defaultdict(list)
    wire: dict[str, list[int]] = defaultdict(list)
    held: list[str] = []  # the mtls receiver's cards, all of tenant "bench"
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        certs = make_dev_certs(Path(tmp) / "certs")
        certs.write_tokens({"bench": TOKEN, "*": RELAY})
        pairs = {mode: stack.enter_context(_pair(mode, certs, runtime)) for mode in MODES}
        for row in tqdm(rows, desc="bench tls", unit="row"):
            for codec in codecs:
                for mode, (_, sender, tls, token) in pairs.items():
                    start = time.perf_counter()
                    # a client per call: the time includes connecting (and the TLS handshake)
                    with SenderClient(sender.address, tls=tls, token=token, timeout_s=600) as user:
                        answer = user.ask(row["context"], row["question"], codec=codec, max_new_tokens=1)
                    client[codec, mode].append(time.perf_counter() - start)
                    transfer[codec, mode].append(answer.stats.transfer_s)
                    if mode == "plaintext":
                        wire[codec].append(answer.stats.wire_bytes)
                    if mode == "mtls":
                        held.append(answer.stats.card_id)
        lookups = lookup_times(pairs["mtls"][0].address, certs, held)
    return table(codecs, rows, client, transfer, wire, args) + "\n\n" + lookup_table(lookups)


def lookup_times(receiver: str, certs: DevCerts, held: list[str], rounds: int = 2000) -> dict[str, list[float]]:
    """HasCard latency (s) over mTLS as the relay: the owner's card, another tenant's, an absent one."""
    tls = ClientTLS(str(certs.ca), str(certs.cert("client")), str(certs.key("client")))
    cases = {"owner's card (present)": ("bench", True), "another tenant's card": ("other", True),
             "absent card": ("other", False)}
    times: dict[str, list[float]] = defaultdict(list)
    with open_channel(receiver, tls, GRPC_OPTIONS) as channel:
        stub = services_pb2_grpc.ReceiverServiceStub(channel)
        for i in range(rounds):
            for case, (tenant, present) in cases.items():
                card_id = held[i % len(held)] if present else secrets.token_hex(32)
                start = time.perf_counter()
                reply = stub.HasCard(pb.HasCardRequest(card_id=card_id), metadata=call_metadata(RELAY, tenant))
                times[case].append(time.perf_counter() - start)
                assert reply.present == (tenant == "bench"), case
    return times


def lookup_table(times: dict[str, list[float]]) -> str:
    def q(xs: list[float], p: int) -> float:
        return statistics.quantiles(xs, n=100, method="inclusive")[p - 1] * 1e6

    lines = [f"`HasCard` over mTLS, {len(next(iter(times.values())))} interleaved rounds (microseconds)", "",
             "| lookup | p50 | p90 | p99 |", "|---|---|---|---|"]
    lines += [f"| {case} | {q(xs, 50):,.0f} | {q(xs, 90):,.0f} | {q(xs, 99):,.0f} |" for case, xs in times.items()]
    return "\n".join(lines)


def table(codecs: list[str], rows: list[dict], client: dict, transfer: dict, wire: dict,
          args: argparse.Namespace) -> str:
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731 - ms
    lines = [
        f"`qkvcomm bench tls --data {args.data.name} --limit {args.limit}` ({len(rows)} rows, model {args.model}, "
        f"CPU, one-token answers; {machine()})",
        "",
        "| codec | mean wire | mode | client latency p50 (ms) | x plaintext | transfer p50 (ms) | x plaintext |",
        "|---|---|---|---|---|---|---|",
    ]
    for codec in codecs:
        base_c, base_t = med(client[codec, "plaintext"]), med(transfer[codec, "plaintext"])
        for mode in MODES:
            c, t = med(client[codec, mode]), med(transfer[codec, mode])
            lines.append(f"| {codec} | {statistics.mean(wire[codec]) / 1e6:.2f} MB | {mode} | {c:,.0f} "
                         f"| {c / base_c:.2f} | {t:,.1f} | {t / base_t:.2f} |")
    return "\n".join(lines)
