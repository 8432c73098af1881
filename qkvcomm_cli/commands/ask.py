"""`qkvcomm ask`: ask a question about a context through a sender (streams the answer, or --json)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qkvcomm_cli.commands.common import client_tls, connection_flags, layer_ratio, print_stats, with_port


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="ask a question about a context through a sender")
    p.add_argument("--sender", default=os.environ.get("QKVCOMM_SENDER", "127.0.0.1:50062"),
                   help="HOST[:PORT] of the sender (default 127.0.0.1:50062 or QKVCOMM_SENDER; port 50062 if none)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--context", help="the context text")
    src.add_argument("--context-file", type=Path, help="a file holding the context")
    p.add_argument("--question", required=True, help="the question the receiver answers about the context")
    p.add_argument("--codec", default="",
                   help="fp32, fp16, int8, seed-B, kivi-B, budget-B, a spec, text, or auto: the sender picks by "
                        "predicted time to first token (default: the sender's)")
    p.add_argument("--facts", action="store_true",
                   help="extract facts into the card; the receiver reads their summary first")
    p.add_argument("--layers", type=layer_ratio, default=0.0,
                   help="share of layers to send, (0, 1] (default: the sender's)")
    p.add_argument("--layer-method", default="", help="combined, attention, prior, random, contiguous or loo")
    p.add_argument("--session", default="", help="a dialogue id: the context is appended to the session's so far, "
                   "and only its new tokens travel (a delta card); --context '' asks again on the same context")
    p.add_argument("--max-new-tokens", type=int, default=0, help="answer length (default: the receiver's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--timeout-s", type=float, default=600.0, help="deadline of the call (default 600)")
    connection_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qkvcomm_client import QKVCommError, SenderClient  # noqa: PLC0415 - keep `qkvcomm --help` fast

    context = args.context if args.context is not None else args.context_file.read_text()
    on_text = None if args.json else (lambda t: print(t, end="", flush=True))
    try:
        with SenderClient(with_port(args.sender, 50062), tls=client_tls(args), token=args.token, tenant=args.tenant,
                          timeout_s=args.timeout_s) as sender:
            answer = sender.ask(context, args.question, codec=args.codec, facts=args.facts,
                                max_new_tokens=args.max_new_tokens, layer_ratio=args.layers,
                                layer_method=args.layer_method, session=args.session, on_text=on_text)
    except QKVCommError as e:  # the status, its ErrorInfo reason and metadata, and the message
        print(f"qkvcomm ask: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(answer.to_json())
    else:
        print()
        print_stats(answer)
    return 0
