"""`qkvcomm demo` (what `make run` runs): both services on loopback, one handoff, then stop them."""
from __future__ import annotations

import argparse
import sys

from qkv_core.config import DEFAULT_CODEC
from qkvcomm_cli.commands.common import print_stats, runtime_flags

DEMO_CONTEXT = (
    "Release notes for the Atlas API, version 4.2. The rate limit is 600 requests per minute per key. "
    "Bulk exports moved to the /v4/exports endpoint. The maintenance window is every Sunday at 02:00 UTC."
)
DEMO_QUESTION = "What is the rate limit?"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="start both services on loopback, hand off one context, stop them")
    p.add_argument("--context", default=DEMO_CONTEXT)
    p.add_argument("--question", default=DEMO_QUESTION)
    p.add_argument("--codec", default=DEFAULT_CODEC)
    runtime_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qkvcomm_client import SenderClient  # noqa: PLC0415

    from qkvcomm_cli.launch import spawn  # noqa: PLC0415

    runtime = [f"--{k}={v}" for k in ("model", "revision", "device", "dtype") if (v := getattr(args, k))]
    print("starting receiver and sender on loopback (loading the model)...", file=sys.stderr)
    receiver = spawn("receiver", *runtime)
    try:
        sender = spawn("sender", "--receiver", receiver.address, *runtime)
        try:
            print(f"receiver {receiver.address} (metrics :{receiver.metrics_port}), "
                  f"sender {sender.address} (metrics :{sender.metrics_port})", file=sys.stderr)
            print(f"context: {args.context}\nquestion: {args.question}\nanswer: ", end="", flush=True)
            with SenderClient(sender.address) as client:
                answer = client.ask(args.context, args.question, codec=args.codec,
                                    on_text=lambda t: print(t, end="", flush=True))
            print()
            print_stats(answer)
        finally:
            sender.stop()
    finally:
        receiver.stop()
    return 0
