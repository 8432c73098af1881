"""A user's mistakes at the command line, as a user makes them (issue 38): each ends with one line
on stderr saying what and what to do, a non-zero exit code and no traceback; a server refuses a
port already in use, naming it, before it loads a model."""
from __future__ import annotations

import socket
import subprocess
import sys

import grpc
import pytest

from service_common.server import SERVER_OPTIONS

CLI = [sys.executable, "-m", "qkvcomm_cli"]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          check=False)


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


MISTAKES = {
    "context file": (["ask", "--sender", "127.0.0.1:1", "--context-file", "nope.txt", "--question", "q"], "nope.txt"),
    "CA file": (["ask", "--sender", "127.0.0.1:1", "--ca", "missing.pem", "--context", "x", "--question", "q"],
                "missing.pem"),
    "token in clear": (["ask", "--sender", "10.0.0.7:50062", "--token", "t0k", "--context", "x", "--question", "q"],
                       "--insecure"),
    "sender without receiver": (["serve-sender"], "--receiver"),
    "TLS certificate": (["serve-receiver", "--tls-cert", "nope.crt", "--tls-key", "nope.key"], "--tls-cert nope.crt"),
    "certificate without key": (["serve-receiver", "--tls-cert", __file__], "go together"),
    "size without a unit it knows": (["serve-receiver", "--store-bytes", "2X"], "is not a size"),
    "a share of no layers": (["ask", "--layers", "0", "--context", "x", "--question", "q"], "(0, 1]"),
    "unknown flag": (["ask", "--context", "x", "--question", "q", "--no-such-flag"], "unrecognized arguments"),
    "nothing listening": (["health", "--address", "127.0.0.1:1"], "UNREACHABLE"),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_mistake_is_one_line_and_a_non_zero_exit(name):
    args, says = MISTAKES[name]
    done = _run(*args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and says in lines[0], done.stderr
    assert "Traceback" not in done.stderr and "t0k" not in done.stderr


def test_debug_shows_the_traceback():
    done = _run("--debug", "ask", "--sender", "127.0.0.1:1", "--context-file", "nope.txt", "--question", "q")
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_version():
    done = _run("--version")
    assert done.returncode == 0 and done.stdout.startswith("qkvcomm ")


@pytest.mark.parametrize("which", ["--port", "--metrics-port"])
def test_a_server_refuses_a_port_in_use_before_loading_a_model(busy_port, which):
    other = "--metrics-port" if which == "--port" else "--port"
    done = _run("serve-receiver", which, str(busy_port), other, "0")
    assert done.returncode == 1 and f"127.0.0.1:{busy_port}" in done.stderr and "in use" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "loaded" not in done.stderr


def test_two_grpc_servers_never_share_a_port():
    """gRPC's default SO_REUSEPORT would let a second server bind a port in use; the services'
    options turn it off, so the second bind fails."""
    from concurrent.futures import ThreadPoolExecutor

    def bind(options, port: int = 0) -> tuple[grpc.Server, int]:
        server = grpc.server(ThreadPoolExecutor(1), options=options)
        try:
            return server, server.add_insecure_port(f"127.0.0.1:{port}")
        except RuntimeError:
            return server, 0

    _held, port = bind([])  # gRPC's defaults: what the services used to run with
    assert bind([], port)[1] == port  # a second default server shares the port: the bug
    _held, port = bind(SERVER_OPTIONS)
    assert bind(SERVER_OPTIONS, port)[1] == 0 and bind([], port)[1] == 0


def test_sizes_and_durations_take_units_in_flags_and_variables():
    from qkv_core.config import ServiceConfig, parse_duration, parse_size

    assert parse_size("2G") == 2 * 10**9 and parse_size("512Mi") == 512 << 20 and parse_size("1024") == 1024
    assert parse_duration("30s") == 30 and parse_duration("500ms") == 0.5 and parse_duration("2m") == 120
    cfg = ServiceConfig.from_env({"QKVCOMM_STORE_BYTES": "2Gi", "QKVCOMM_IDLE_TIMEOUT_S": "45s"})
    assert cfg.store.store_bytes == 2 << 30 and cfg.limits.idle_timeout_s == 45
    with pytest.raises(ValueError, match="QKVCOMM_STORE_BYTES='lots'.*not a size"):
        ServiceConfig.from_env({"QKVCOMM_STORE_BYTES": "lots"})
    from qkvcomm_cli.commands.common import with_port

    assert [with_port(a, 50062) for a in ("localhost", "h:1", "[::1]", "::1")] == [
        "localhost:50062", "h:1", "[::1]:50062", "[::1]:50062"]
