"""The Info RPC, the sender's early model check, and the google.rpc.ErrorInfo every refusal carries."""
from __future__ import annotations

import urllib.request

import grpc
import pytest
from conftest import TEST_CONFIG, ask, serve_pair, tiny_model
from qkvcomm.v1 import services_pb2_grpc
from qkvcomm_client import error_info

from qkv_core.card.header import FORMAT_VERSION
from qkv_core.wire import pb, push_requests
from service_common.server import GRPC_OPTIONS

pytestmark = pytest.mark.e2e


def test_info_describes_the_loaded_model_and_the_configuration(services, embedded):
    fp = embedded.fingerprint
    with grpc.insecure_channel(services.receiver, options=GRPC_OPTIONS) as channel:
        info = services_pb2_grpc.InfoServiceStub(channel).Info(pb.InfoRequest(), timeout=10)
    with grpc.insecure_channel(services.sender, options=GRPC_OPTIONS) as channel:
        sender = services_pb2_grpc.InfoServiceStub(channel).Info(pb.InfoRequest(), timeout=10)
    assert (info.role, sender.role) == ("receiver", "sender")
    m = info.model
    assert (m.name, m.num_layers, m.num_kv_heads, m.head_dim, m.weights_sha256) == (
        fp.name, fp.num_layers, fp.num_kv_heads, fp.head_dim, fp.weights_sha256)
    assert sender.model == info.model and (info.device, info.dtype) == ("cpu", "float32")
    bits = {c.name: c.bits_per_element for c in info.codecs}
    assert bits["fp16"] == 16 and 4 < bits["kivi-4"] < 5 and 8 < bits["int8"] < 9 and "budget-B" in bits
    assert {"NAME+rot", "NAME+zstd", "NAME+prerope"} <= set(bits)  # the tools, as patterns like budget-B
    assert info.limits.max_card_bytes == TEST_CONFIG.max_card_bytes and info.limits.chunk_bytes == 1 << 20
    assert list(info.features.store_tiers) == ["hot", "memory"] and not info.features.tls and info.version
    assert 0 < info.store_free_bytes <= TEST_CONFIG.store.store_bytes and not info.performance.measured_tokens


def test_a_sender_facing_another_model_refuses_before_prefill_naming_both(tiny):
    with serve_pair(tiny, TEST_CONFIG, TEST_CONFIG, sender_lm=tiny_model(seed=3)) as pair:
        with pytest.raises(grpc.RpcError) as err:
            ask(pair.sender, "The depot opens at nine. " * 4, "When?", codec="int8", timeout_s=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(err.value)
        assert info.reason == "PRECONDITION" and info.domain == "qkvcomm.v1"
        assert (info.metadata["sender_model"], info.metadata["receiver_model"]) == ("tiny-llama-3", "tiny-llama-0")
        assert "weights_sha256" in info.metadata["differ_in"]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{pair.sender_metrics}/metrics", timeout=5).read().decode()
        assert 'qkvcomm_stage_seconds_count{stage="prefill"}' not in metrics  # refused before any prefill
        assert "tiny-llama-3" in err.value.details() and "tiny-llama-0" in err.value.details()


@pytest.mark.parametrize(("call", "code", "reason", "metadata"), [
    ("bad_codec", grpc.StatusCode.INVALID_ARGUMENT, "INVALID", {}),
    ("unknown_card", grpc.StatusCode.NOT_FOUND, "NOT_FOUND", {}),
    ("too_many_tokens", grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT", {"limit": "max_new_tokens_limit"}),
    ("future_card", grpc.StatusCode.FAILED_PRECONDITION, "PRECONDITION", {}),
    ("garbage", grpc.StatusCode.INVALID_ARGUMENT, "UNDECODABLE", {}),
])
def test_every_refusal_carries_its_error_info(services, receiver_stub, call, code, reason, metadata):
    if call == "bad_codec":
        do = lambda: ask(services.sender, "Some context.", "Who?", codec="int4")  # noqa: E731
    elif call == "unknown_card":
        do = lambda: list(receiver_stub.Generate(pb.GenerateRequest(card_id="0" * 64, query="Who?")))  # noqa: E731
    elif call == "too_many_tokens":
        do = lambda: list(receiver_stub.Generate(pb.GenerateRequest(card_id="0" * 64, query="Who?",  # noqa: E731
                                                                    max_new_tokens=10**6)))
    elif call == "future_card":
        future = pb.CardFrame(header=pb.CardHeader(format_version=FORMAT_VERSION + 9))
        do = lambda: receiver_stub.PushCard(push_requests(iter([future])))  # noqa: E731
    else:
        with grpc.insecure_channel(services.receiver) as channel:
            push = channel.stream_unary("/qkvcomm.v1.ReceiverService/PushCard", request_serializer=lambda b: b,
                                        response_deserializer=pb.PushCardResponse.FromString)
            with pytest.raises(grpc.RpcError) as err:
                push(iter([b"\xff\xfe garbage"]), timeout=10)
        do = None
    if do is not None:
        with pytest.raises(grpc.RpcError) as err:
            do()
    assert err.value.code() == code
    info = error_info(err.value)
    assert info is not None and info.reason == reason and info.domain == "qkvcomm.v1"
    assert metadata.items() <= dict(info.metadata).items()
