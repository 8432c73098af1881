"""The vLLM receiver (`qkvcomm serve-receiver --engine vllm`) behind a real sender: Ask unchanged.

The receiver runs in this (the vLLM) environment; the sender runs in the project's own
(QKVCOMM_PROJECT_PYTHON, set by `make test-vllm`: it needs the project's transformers). Answers
through the sender on fp16 cards equal vLLM's own answers with the context in the prompt; the cards'
tokens are loaded, not computed (the receiver's cached-tokens counter); a text handoff answers the
same; cards vLLM cannot take (another model's, layer-selected) are refused with FAILED_PRECONDITION."""
from __future__ import annotations

import json
import os
import re
import tempfile
import urllib.request

import pytest

pytest.importorskip("vllm", reason="the vLLM environment (make test-vllm) is not this one")
import grpc  # noqa: E402
from conftest import CARDS  # noqa: E402
from qkvcomm_client import ReceiverClient, SenderClient  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from qkv_core.store.cardfile import from_bytes  # noqa: E402
from qkv_core.store.disk import card_path  # noqa: E402
from qkv_core.wire import pb  # noqa: E402
from qkvcomm_cli.launch import Child, spawn  # noqa: E402

PROJECT_PYTHON = os.environ.get("QKVCOMM_PROJECT_PYTHON", "")
# prefix caching on, as by default
VLLM_ARGS = json.dumps({"max_model_len": 4096, "enforce_eager": True, "block_size": 32, "seed": 0})


@pytest.fixture(scope="module")
def services(made):
    if not PROJECT_PYTHON:
        pytest.skip("QKVCOMM_PROJECT_PYTHON (the project's environment, for the sender) is not set")
    with tempfile.TemporaryDirectory() as store:
        receiver = spawn("receiver", "--engine", "vllm", "--device", "cpu", "--dtype", "float32", "--store-dir", store,
                         "--performance-tokens", "0", "--vllm-args", VLLM_ARGS, timeout_s=600)
        try:
            sender = spawn("sender", "--receiver", receiver.address, "--device", "cpu", "--dtype", "float32",
                           python=PROJECT_PYTHON, timeout_s=600)
        except BaseException:
            receiver.stop()
            raise
        try:
            yield receiver, sender
        finally:
            sender.stop()
            receiver.stop()


def cached_tokens(receiver: Child) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{receiver.metrics_port}/metrics", timeout=10).read().decode()
    m = re.search(r"^qkvcomm_generation_cached_tokens_total\{[^}]*\} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_asks_through_a_sender_equal_vllms_own_answers(services, made, llm):
    receiver, sender = services
    rows = made["rows"]
    assert len(rows) >= 10
    reference = llm.generate([TokensPrompt(prompt_token_ids=r["prompt"]) for r in rows],
                             SamplingParams(max_tokens=32, temperature=0), use_tqdm=False)
    with SenderClient(sender.address, timeout_s=600) as client, ReceiverClient(receiver.address) as direct:
        info = direct.info()
        assert info.features.engine == "vllm" and not info.features.sessions and not info.features.layer_selection
        before, pairs, loaded = cached_tokens(receiver), [], 0.0
        for row, ref in zip(rows, reference):
            answer = client.ask(row["context"], row["question"], codec="fp16", max_new_tokens=32)
            pairs.append((answer.text, ref.outputs[0].text))
            after = cached_tokens(receiver)
            assert after - before >= row["context_tokens"] // 32 * 32 > 0  # the card's blocks were loaded
            loaded, before = loaded + after - before, after
        same = sum(a == b for a, b in pairs)
        print(f"vLLM receiver: answers equal vLLM's own on {same} of {len(rows)} rows; {loaded:.0f} tokens loaded")
        assert same >= len(rows) - 1, [p for p in pairs if p[0] != p[1]]
        # the text handoff: vLLM prefills the context itself, and answers the same
        q, ref = rows[0], reference[0].outputs[0].text
        assert client.ask(q["context"], q["question"], codec="text", max_new_tokens=32).text == ref


def test_cards_vllm_cannot_take_are_refused(services, made):
    receiver, sender = services
    q = made["rows"][0]
    with SenderClient(sender.address, timeout_s=600) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.ask(q["context"], q["question"], codec="fp16", layer_ratio=0.5, max_new_tokens=8)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
    # a card of another model (a 3-layer Llama), pushed as it is on disk
    key = ("", made["foreign_card"])
    data = card_path(CARDS / "store", made["namespace"], key).read_bytes()
    frames = list(from_bytes(data, made["namespace"], key, None))
    with grpc.insecure_channel(receiver.address) as channel:
        from qkvcomm.v1 import services_pb2_grpc  # noqa: PLC0415

        push = services_pb2_grpc.ReceiverServiceStub(channel).PushCard
        with pytest.raises(grpc.RpcError) as e:
            push(iter([pb.PushCardRequest(frame=f) for f in frames]), timeout=60)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
