"""`qkvcomm bench transport` runs end to end on a small card (its numbers are the benchmark's
business, not a test's): every path moves every byte, and the table names each path."""
from __future__ import annotations

import argparse

import pytest

from qkv_eval import bench_transport

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_bench_transport_moves_the_card_by_every_path():
    args = argparse.Namespace(tokens=64, repeats=1, paths="socket,socket+tls,grpc-bytes,pushcard,bulk", link="")
    table = bench_transport.run(args)  # raises if a peer took fewer bytes than the card's
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| path")]
    assert [row.split(" | ")[0].strip("| ") for row in rows] == args.paths.split(",")
    assert all(float(row.split(" | ")[1]) > 0 for row in rows) and "| socket | " in table and "1.00 |" in table
