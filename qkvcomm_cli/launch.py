"""Start the services as child processes on free loopback ports (demo and tests)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from service_common.server import READY


@dataclass
class Child:
    role: str
    process: subprocess.Popen
    port: int
    metrics_port: int
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (graceful shutdown), then SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def spawn(role: str, *args: str, timeout_s: float = 300.0, port: int = 0, env: dict[str, str] | None = None,
          python: str = sys.executable, host: str = "127.0.0.1", wrapper: Sequence[str] = ()) -> Child:
    """Run `qkvcomm serve-ROLE --host HOST --port PORT --metrics-port 0 ARGS` (PORT 0: a free one)
    with `python` (another environment's, e.g. vLLM's) behind `wrapper` (e.g. `ip netns exec NS`),
    `env` added to this process's environment, and wait for its ready line."""
    cmd = [*wrapper, python, "-m", "qkvcomm_cli", f"serve-{role}", "--host", host, "--port", str(port),
           "--metrics-port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    assert proc.stdout is not None
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            if line.startswith(f"{READY} {role} "):
                fields = dict(item.split("=", 1) for item in line.split()[2:])
                port = int(fields["grpc"].rsplit(":", 1)[1])
                # Keep draining stdout so the child never blocks on a full pipe.
                threading.Thread(target=proc.stdout.read, daemon=True).start()
                return Child(role, proc, port, int(fields["metrics"]), host)
    finally:
        timer.cancel()
    raise RuntimeError(f"{role} exited (code {proc.wait()}) before it was ready; see its log above")
