"""`qkvcomm health`: exit 0 when a service answers grpc.health.v1 with SERVING (Docker HEALTHCHECK)."""
from __future__ import annotations

import argparse
import os
import sys

from qkvcomm_cli.commands.common import client_tls, connection_flags, with_port


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("health", help="exit 0 when a service answers gRPC health checks with SERVING")
    p.add_argument("--address", default=f"127.0.0.1:{os.environ.get('QKVCOMM_PORT', '50061')}",
                   help="HOST[:PORT] (default port 50061, the receiver's; the sender's is 50062)")
    p.add_argument("--service", default="", help="service name ('' = the whole server)")
    connection_flags(p, token=False)  # health is open: probes carry no token
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qkvcomm_client import ReceiverClient  # noqa: PLC0415 - any service answers health

    address = with_port(args.address, 50061)
    with ReceiverClient(address, tls=client_tls(args)) as service:
        state = service.health(args.service)
    print(f"{state}: nothing answers at {address}" if state == "UNREACHABLE" else state, file=sys.stderr)
    return 0 if state == "SERVING" else 1
