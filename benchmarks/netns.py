"""Two "hosts" on one machine for the benchmarks (root): network namespaces qkvnet-snd and
qkvnet-rcv joined by a veth pair whose sender side can be shaped with `tc qdisc ... tbf`, and the
services started inside them. Traffic never leaves the machine."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

SND, RCV = "qkvnet-snd", "qkvnet-rcv"
SND_IP, RCV_IP = "10.231.0.1", "10.231.0.2"  # inside the namespaces only


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def setup(rate: str | None) -> None:
    """The namespaces and the veth pair, shaped to `rate` (tc syntax, e.g. 100mbit; None: unshaped)."""
    teardown()
    for ns in (SND, RCV):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", "qkv-snd0", "netns", SND, "type", "veth", "peer", "name", "qkv-rcv0", "netns", RCV)
    sh("ip", "-n", SND, "addr", "add", f"{SND_IP}/24", "dev", "qkv-snd0")
    sh("ip", "-n", RCV, "addr", "add", f"{RCV_IP}/24", "dev", "qkv-rcv0")
    sh("ip", "-n", SND, "link", "set", "qkv-snd0", "up")
    sh("ip", "-n", RCV, "link", "set", "qkv-rcv0", "up")
    shape(rate)


def shape(rate: str | None) -> None:
    """The sender-to-receiver direction at `rate` through a token bucket (None: unshaped)."""
    sh("ip", "netns", "exec", SND, "tc", "qdisc", "del", "dev", "qkv-snd0", "root", check=False)
    if rate:
        sh("ip", "netns", "exec", SND, "tc", "qdisc", "add", "dev", "qkv-snd0", "root", "tbf", "rate", rate,
           "burst", "64kb", "latency", "200ms")


def teardown() -> None:
    for ns in (SND, RCV):
        sh("ip", "netns", "del", ns, check=False)


def serve(ns: str, role: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "qkvcomm_cli", f"serve-{role}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    for line in proc.stdout:
        if line.startswith(f"ready {role}"):
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc
    raise RuntimeError(f"{role} did not start")


def in_sender_ns(code: str) -> str:
    """Run a Python snippet inside the sender's namespace (where the sender listens on loopback)."""
    out = sh("ip", "netns", "exec", SND, sys.executable, "-c", code)
    return out.stdout.strip()


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
