"""qkvcomm: the command line. Dispatch only: each command lives in qkvcomm_cli/commands/."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from qkv_core import malloc, package_version
from qkv_core.config import qa_file
from qkvcomm_cli.commands import ask, bench, calibrate, certs, demo, evaluate, health, serve
from service_common import logs

COMMANDS = (serve, ask, demo, health, certs, calibrate, evaluate, bench)


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line and exit code 2, not a usage dump (`--help` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="qkvcomm", description="Hand compressed KV caches between LLM agents over gRPC.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("--debug", action="store_true", default=os.environ.get("QKVCOMM_DEBUG", "") not in ("", "0"),
                    help="show the Python traceback of an error (also QKVCOMM_DEBUG=1)")
    ap.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    ap.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("QKVCOMM_LOG_FORMAT", "text"),
                    help="log lines as text or one JSON object each (also QKVCOMM_LOG_FORMAT)")
    sub = ap.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    malloc.tune()
    logs.configure(logging.DEBUG if args.verbose else logging.INFO, args.log_format)
    if getattr(args, "data", None) is not None:  # every --data: a path, or a file name in QKVCOMM_DATA_DIR
        try:
            args.data = qa_file(args.data)
        except FileNotFoundError as e:
            raise SystemExit(f"qkvcomm {args.command}: {e}") from None
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a user's mistake (a missing file, a bad flag, a busy port) is one line
        if args.debug:
            raise
        print(f"qkvcomm {args.command}: error: {_message(e)} (--debug shows the traceback)", file=sys.stderr)
        return 1


def _message(error: Exception) -> str:
    """An error as one line: its text, or its type when it has none."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = " ".join(str(error).split())
    return text or type(error).__name__

