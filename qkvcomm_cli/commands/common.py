"""What several commands share: the runtime flags of one-shot commands and the stats printout."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from qkvcomm_client import ClientTLS

from qkv_core.config import RuntimeConfig


def runtime_flags(p: argparse.ArgumentParser) -> None:
    """--model, --revision, --device, --dtype, made from RuntimeConfig's fields."""
    for f in dataclasses.fields(RuntimeConfig):
        p.add_argument(f"--{f.name}", help=f"{f.metadata['help']} (default {f.default or 'none'})")


def runtime(args: argparse.Namespace, model: str | None = None) -> RuntimeConfig:
    """The runtime flags of a one-shot command (eval, calibrate); `model` overrides --model."""
    given = {f.name: v for f in dataclasses.fields(RuntimeConfig) if (v := getattr(args, f.name, None))}
    return RuntimeConfig(**{**given, **({"model": model} if model else {})})


def connection_flags(p: argparse.ArgumentParser, token: bool = True) -> None:
    """How a client command reaches a service: TLS files, a server name, a token."""
    p.add_argument("--ca", default="", help="CA bundle (PEM) of the server's certificate; set, the client speaks TLS")
    p.add_argument("--cert", default="", help="client certificate (PEM), for a server that requires one (mTLS)")
    p.add_argument("--key", default="", help="the client certificate's key (PEM)")
    p.add_argument("--server-name", default="",
                   help="name the server's certificate must carry, when not the host dialled")
    if token:
        p.add_argument("--token", default=os.environ.get("QKVCOMM_TOKEN", ""),
                       help="bearer token (default QKVCOMM_TOKEN, which keeps it out of the process list)")
        p.add_argument("--tenant", default="", help="tenant to act for (a token of tenant '*' only)")
        p.add_argument("--insecure", action="store_true",
                       help="send the token in plaintext to a host off loopback (refused without this)")


def with_port(address: str, port: int) -> str:
    """HOST:PORT as given, or HOST with the service's default port (not gRPC's 443)."""
    if address.startswith(("unix:", "dns:")):
        return address
    if address.startswith("["):  # [V6] or [V6]:PORT
        return address if ":" in address.rsplit("]", 1)[-1] else f"{address}:{port}"
    colons = address.count(":")
    return address if colons == 1 else f"[{address}]:{port}" if colons else f"{address}:{port}"


def layer_ratio(text: str) -> float:
    """--layers: a share of layers in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]: the share of layers a card carries")
    return value


def client_tls(args: argparse.Namespace) -> ClientTLS:
    return ClientTLS(args.ca, args.cert, args.key, args.server_name, getattr(args, "insecure", False))


def print_stats(answer: object) -> None:
    s = answer.stats  # type: ignore[attr-defined]
    if s.card_reused:
        wire = "nothing sent: the receiver holds the card"
    elif s.codec == "text":
        wire = f"wire {s.wire_bytes:,} B of text: the receiver prefilled it"
    else:
        sent = s.context_tokens - s.reused_tokens
        delta = f"  [delta: {s.reused_tokens} tokens held, {sent} sent]" if s.delta else ""
        wire = (f"wire {s.wire_bytes:,} B  vs fp16 KV {s.kv_fp16_bytes:,} B  -> {s.compression_ratio:.2f}x "
                f"(vs fp32: {s.compression_ratio_fp32:.2f}x){delta}")
    print(
        f"\n--\ncard {s.card_id[:12]}  codec {s.codec}  context {s.context_tokens} tokens\n{wire}\n"
        f"prefill {s.prefill_s * 1e3:.0f} ms  quantize {s.quantize_s * 1e3:.0f} ms  "
        f"transfer {s.transfer_s * 1e3:.0f} ms  "
        f"dequantize {s.dequantize_s * 1e3:.0f} ms  ttft {s.ttft_s * 1e3:.0f} ms  total {s.total_s * 1e3:.0f} ms",
        file=sys.stderr,
    )
    if s.HasField("auto"):
        a = s.auto
        print(f"auto: chose {s.codec} (predicted {a.predicted_s * 1e3:.0f} ms, measured {a.measured_s * 1e3:.0f} ms; "
              f"link {a.throughput_bytes_per_s / 1e6:.1f} MB/s, rtt {a.rtt_s * 1e3:.1f} ms, receiver prefill "
              f"{a.receiver_prefill_tokens_per_s:.0f} tokens/s)", file=sys.stderr)
