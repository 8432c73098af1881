"""The Node.js client (clients/node, installed by `make test` with `npm ci`) against real services."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import TOKENS

from qkvcomm_cli.commands.demo import DEMO_CONTEXT, DEMO_QUESTION

NODE_DIR = Path(__file__).resolve().parents[1] / "clients" / "node"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed"),
    pytest.mark.skipif(not (NODE_DIR / "node_modules").exists(), reason="run `make node-client` (npm ci) first"),
]


def _ask(sender: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["node", str(NODE_DIR / "ask.js"), "--sender", sender, *extra],
        capture_output=True, text=True, timeout=120,
    )


def test_node_client_gets_a_correct_answer_and_the_stats(services):
    done = _ask(services.sender, "--context", DEMO_CONTEXT, "--question", DEMO_QUESTION, "--codec", "kivi-4", "--json")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert "600" in reply["answer"]
    assert reply["codec"] == "kivi-4"
    assert reply["wire_bytes"] > 0 and reply["compression_ratio"] > 3
    assert reply["context_tokens"] > 20


def test_node_client_streams_text_and_reports_errors(services):
    done = _ask(services.sender, "--context", DEMO_CONTEXT, "--question", DEMO_QUESTION)
    assert done.returncode == 0, done.stderr
    assert "600" in done.stdout and "vs fp16 KV" in done.stderr
    bad = _ask(services.sender, "--context", DEMO_CONTEXT, "--question", DEMO_QUESTION, "--codec", "int4")
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT INVALID: unknown codec" in bad.stderr  # the status, its ErrorInfo reason, the message


def test_node_client_keeps_a_session_whose_second_turn_is_a_delta_card(services):
    document = " ".join(f"Depot {i} in sector {i} holds {100 + 7 * i} crates and opens at {i % 12 + 1} o'clock."
                        for i in range(8))
    first = _ask(services.sender, "--context", document, "--question", "How many crates does depot 3 hold?",
                 "--codec", "int8", "--session", "node-1", "--json")
    assert first.returncode == 0, first.stderr
    turn = _ask(services.sender, "--context", "Depot 9 closed in May.", "--question", "Which depot closed?",
                "--codec", "int8", "--session", "node-1", "--json")
    assert turn.returncode == 0, turn.stderr
    before, after = json.loads(first.stdout), json.loads(turn.stdout)
    assert not before["delta"] and after["delta"] and after["parent_card_id"] == before["card_id"]
    assert after["reused_tokens"] > 0.8 * before["context_tokens"] and after["wire_bytes"] < before["wire_bytes"] / 4


def test_node_client_completes_a_tls_and_token_handoff(secure_services):
    s = secure_services
    tls = ["--ca", str(s.certs.ca), "--context", DEMO_CONTEXT, "--question", DEMO_QUESTION, "--json"]
    done = subprocess.run(["node", str(NODE_DIR / "ask.js"), "--sender", s.sender, *tls],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "QKVCOMM_TOKEN": TOKENS["alice"]})
    assert done.returncode == 0, done.stderr
    assert "600" in json.loads(done.stdout)["answer"]
    refused = _ask(s.sender, *tls, "--token", "not-a-token")
    assert refused.returncode == 1 and "UNAUTHENTICATED UNAUTHENTICATED: unknown token" in refused.stderr


def test_the_node_package_installs_outside_the_repo_and_its_library_asks(services, tmp_path):
    """npm pack (the protos packed inside), npm install in an empty directory, then the library:
    info, ask, and the ErrorInfo of a refusal."""
    packed = subprocess.run(["npm", "pack", "--silent", "--pack-destination", str(tmp_path)], cwd=NODE_DIR,
                            capture_output=True, text=True, timeout=120, check=True).stdout.strip().splitlines()[-1]
    app = tmp_path / "app"
    app.mkdir()
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefer-offline", "--silent",
                    str(tmp_path / packed)],
                   cwd=app, capture_output=True, text=True, timeout=300, check=True)
    script = """
const { connect, errorInfo } = require('qkvcomm-node-client');
(async () => {
  const client = connect(process.argv[1], { timeoutS: 120 });
  const info = await client.info();
  const answer = await client.ask({ context: process.argv[2], question: process.argv[3], codec: 'kivi-4' });
  let refused = null;
  try { await client.ask({ context: 'Some text.', question: 'Who?', codec: 'int4' }); } catch (err) { refused =
  errorInfo(err); }
  client.close();
  console.log(JSON.stringify({ model: info.model.name, answer: answer.text, codec: answer.stats.codec, refused }));
})();
"""
    done = subprocess.run(["node", "-e", script, services.sender, DEMO_CONTEXT, DEMO_QUESTION], cwd=app,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "QKVCOMM_PROTO_DIR": ""})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["model"] == "smollm2-135m" and "600" in out["answer"] and out["codec"] == "kivi-4"
    assert out["refused"]["reason"] == "INVALID" and out["refused"]["domain"] == "qkvcomm.v1"
