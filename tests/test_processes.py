"""The services as real processes: the CLI's ask --json against them, then graceful shutdown."""
import json
import subprocess
import sys

import pytest

from qkvcomm_cli.launch import spawn

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_cli_ask_json_against_service_processes():
    receiver = spawn("receiver")
    try:
        sender = spawn("sender", "--receiver", receiver.address)
        try:
            out = subprocess.run(
                [sys.executable, "-m", "qkvcomm_cli", "ask", "--sender", sender.address, "--json",
                 "--context", "The museum opens at 9:30 and closes at 17:00. Entry costs 12 euros.",
                 "--question", "How much does entry cost?", "--codec", "int8"],
                capture_output=True, text=True, timeout=120, check=True,
            )
            result = json.loads(out.stdout)
            assert "12" in result["answer"]
            for key in ("wire_bytes", "kv_fp16_bytes", "compression_ratio", "context_tokens", "ttft_s"):
                assert result[key] > 0, key
            assert result["compression_ratio"] == pytest.approx(result["kv_fp16_bytes"] / result["wire_bytes"])
            refused = subprocess.run(
                [sys.executable, "-m", "qkvcomm_cli", "ask", "--sender", sender.address, "--context", "Some text.",
                 "--question", "Who?", "--codec", "int4"], capture_output=True, text=True, timeout=120,
            )
            assert refused.returncode == 1  # a status with its ErrorInfo reason, not a traceback
            assert "INVALID_ARGUMENT INVALID: unknown codec 'int4'" in refused.stderr
            assert "Traceback" not in refused.stderr
        finally:
            assert sender.stop() == 0  # SIGTERM: graceful shutdown, clean exit
    finally:
        assert receiver.stop() == 0


def test_a_sender_and_a_receiver_started_together_answer_the_first_ask():
    """Started at the same moment, the sender's first calls meet a receiver that is still loading
    and measuring its speed; the first ask made after both print `ready` waits for it (within its
    deadline) instead of failing with the channel's last connection error."""
    import socket
    import threading

    from conftest import ask

    for attempt in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        started: dict = {}
        threads = [threading.Thread(target=lambda: started.setdefault("receiver", spawn(
                       "receiver", port=port, env={"QKVCOMM_PERFORMANCE_TOKENS": "512"}))),
                   threading.Thread(target=lambda: started.setdefault("sender", spawn(
                       "sender", "--receiver", f"127.0.0.1:{port}")))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        try:
            answer = ask(started["sender"].address, "The rate limit is 600 requests per minute.",
                         "What is the rate limit?", codec="int8", timeout_s=120)
            assert "600" in answer.text, (attempt, answer.text)
        finally:
            for child in started.values():
                child.stop()
