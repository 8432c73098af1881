#!/usr/bin/env python3
"""Two hosts over a shaped link, and the link cut mid-card (root; `make link-faults`).

Sender and receiver run in two network namespaces this script makes (qkvnet-snd, qkvnet-rcv),
joined by a veth pair whose sender side is shaped with `tc qdisc ... tbf` (RATE, default
20mbit). For each cut length, one Ask of a ~1,500-token fp16 card (35 MB, ~14 s on the wire at
20 Mbit/s) runs while the link is set down once 1 s of the card is on the wire, then up again:
    short cut (3 s):   TCP retransmits and the card arrives, or the call ends with a status;
    long cut (> the receiver's idle timeout, 10 s here): the receiver drops the stream
                       (DEADLINE_EXCEEDED), frees its intake, and stores nothing.
Then one more Ask over the restored link must succeed. Prints one markdown table row per cut.
Everything is torn down at the end, also on failure.

    sudo .venv/bin/python benchmarks/link_faults.py [--rate 20mbit] [--cuts 3,15]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from netns import RCV, RCV_IP, SND, SND_IP, in_sender_ns, serve, setup, sh, stop, teardown

IDLE_S = 10.0


ASK = """
import json, time, grpc
from qkvcomm_client import SenderClient
ctx = open({path!r}).read()
t = time.perf_counter()
try:
    a = SenderClient("127.0.0.1:50062", timeout_s=90).ask(ctx, "What is the first paragraph about?", codec="fp16")
    print(json.dumps({{"status": "OK", "s": time.perf_counter() - t, "reused": a.stats.card_reused,
                      "prefill_s": a.stats.prefill_s, "transfer_s": a.stats.transfer_s}}))
except grpc.RpcError as e:
    print(json.dumps({{"status": e.code().name, "s": time.perf_counter() - t, "detail": e.details()[:120]}}))
"""


def gauge(name: str) -> float:
    code = (f"import urllib.request; "
            f"t = urllib.request.urlopen('http://{RCV_IP}:9461/metrics', timeout=5).read().decode();"
            f"print(next(l.split()[1] for l in t.splitlines() if l.startswith('{name} ')))")
    return float(in_sender_ns(code))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", default="20mbit")
    ap.add_argument("--cuts", default="3,15", help="seconds the link stays down, comma-separated")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("link_faults.py needs root (network namespaces, tc)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from qkv_core.config import qa_file  # noqa: PLC0415

    rows = [json.loads(line) for line in qa_file("squad.jsonl").read_text().splitlines()][::24][:9]
    context = Path("/tmp/qkvnet-context.txt")
    context.write_text("\n\n".join(r["context"] for r in rows))
    setup(args.rate)
    procs = []
    try:
        procs.append(serve(RCV, "receiver", "--host", RCV_IP, "--port", "50061", "--metrics-port", "9461",
                           env={"QKVCOMM_IDLE_TIMEOUT_S": str(IDLE_S)}))
        procs.append(serve(SND, "sender", "--host", "127.0.0.1", "--port", "50062", "--metrics-port", "9462",
                           "--receiver", f"{RCV_IP}:50061"))
        print(f"link: veth {args.rate} (tbf), receiver idle timeout {IDLE_S:g} s, card: fp16 of "
              f"{context.stat().st_size:,} characters of SQuAD paragraphs\n")
        print("| cut | Ask during the cut | its time (s) | its transfer (s) | receiver intakes after "
              "| card stored by it | next Ask | its time (s) |")
        print("|---|---|---|---|---|---|---|---|")
        base = context.read_text()
        for cut in (float(c) for c in args.cuts.split(",")):
            context.write_text(f"{base}\n\nCut of {cut:g} seconds.")  # a new card for each cut
            result: dict = {}
            ask = ASK.format(path=str(context))
            asker = threading.Thread(target=lambda: result.update(json.loads(in_sender_ns(ask))))
            asker.start()
            deadline = time.time() + 60
            while time.time() < deadline and gauge("qkvcomm_intakes_in_flight") < 1:
                time.sleep(0.05)
            time.sleep(1.0)  # a second of the card on the wire
            sh("ip", "-n", SND, "link", "set", "qkv-snd0", "down")
            time.sleep(cut)
            sh("ip", "-n", SND, "link", "set", "qkv-snd0", "up")
            sh("ip", "-n", SND, "addr", "replace", f"{SND_IP}/24", "dev", "qkv-snd0")
            asker.join(120)
            time.sleep(IDLE_S + 2)
            intakes = gauge("qkvcomm_intakes_in_flight")
            after = json.loads(in_sender_ns(ASK.format(path=str(context))))
            # The card id is the content's: the next Ask reuses the card exactly when the cut one was stored.
            stored = "yes" if after.get("reused") else "no"
            print(f"| {cut:g} s | {result.get('status')} | {result.get('s', 0):.1f} "
                  f"| {result.get('transfer_s', 0):.1f} | {intakes:g} | {stored} | {after['status']} "
                  f"| {after['s']:.1f} |", flush=True)
    finally:
        stop(*procs)
        teardown()
        context.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
