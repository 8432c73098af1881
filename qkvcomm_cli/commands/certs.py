"""`qkvcomm certs dev DIR`: a development CA with a server and a client certificate (compose's
tls profile, tests, trying mutual TLS on one machine)."""
from __future__ import annotations

import argparse
import secrets
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="make development TLS certificates")
    kinds = p.add_subparsers(dest="kind", required=True)
    dev = kinds.add_parser("dev", help="a CA, a server and a client certificate (ECDSA P-256) in DIR")
    dev.add_argument("directory", type=Path, metavar="DIR")
    dev.add_argument("--host", action="append", default=None,
                     help="a name or address the server certificate carries (repeatable; default: localhost, "
                          "127.0.0.1, ::1, receiver, sender)")
    dev.add_argument("--client", default="qkvcomm-client", help="the client certificate's common name")
    dev.add_argument("--days", type=int, default=365)
    dev.add_argument("--tokens", action="store_true",
                     help="also write DIR/tokens: a random client token for tenant 'demo' (a sender's --auth-tokens)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from service_common.certs import DEFAULT_HOSTS, make_dev_certs  # noqa: PLC0415 - keep `qkvcomm --help` fast

    made = make_dev_certs(args.directory, tuple(args.host or DEFAULT_HOSTS), args.client, args.days)
    print(f"wrote ca.crt, server.crt/.key and client.crt/.key to {made.directory} "
          "(development only: the CA key is beside them)")
    if args.tokens:
        path = made.write_tokens({"demo": secrets.token_urlsafe(32)})
        print(f"wrote {path}: one 'TOKEN TENANT' line; clients send that token (qkvcomm ask --token, or QKVCOMM_TOKEN)")
    return 0
