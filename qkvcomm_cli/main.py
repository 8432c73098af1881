"""qkvcomm: the command line. Dispatch only: each command lives in qkvcomm_cli/commands/."""
from __future__ import annotations

import argparse
import logging
import sys

from qkvcomm_client import PlaintextToken

from qkv_core import allocator
from qkv_core.config import qa_file
from qkvcomm_cli.commands import ask, bench, calibrate, certs, demo, evaluate, health, serve

COMMANDS = (serve, ask, demo, health, certs, calibrate, evaluate, bench)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qkvcomm", description="Hand compressed KV caches between LLM agents over gRPC.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    allocator.tune()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
    )
    if getattr(args, "data", None) is not None:  # every --data: a path, or a file name in QKVCOMM_DATA_DIR
        try:
            args.data = qa_file(args.data)
        except FileNotFoundError as e:
            raise SystemExit(f"qkvcomm {args.command}: {e}") from None
    try:
        return args.run(args)
    except PlaintextToken as e:  # a refusal to start, not a fault: one line
        raise SystemExit(f"qkvcomm {args.command}: {e}") from None
