"""End to end over real gRPC on loopback: answers, bad input, health, reflection, metrics."""
import urllib.request

import grpc
import pytest
from conftest import ask
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from qkv_core.card.framing import frames
from qkv_core.card.header import FORMAT_VERSION
from qkv_core.config import MAX_CHUNK_BYTES
from qkv_core.engine.sender import SenderEngine
from qkv_core.facts import FactConfig
from qkv_core.wire import pb, push_requests

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

FACTS = [
    ("The Atlas API allows 600 requests per minute per key. Exports use the /v4/exports endpoint.",
     "How many requests per minute does the Atlas API allow?", "600"),
    ("The Harbor Festival was held on 14 March 2023 at the old pier, with music and food stalls.",
     "On what date was the Harbor Festival held?", "14 March 2023"),
    ("Mara Lindqvist moved from Oslo to Lisbon in 2019 to open a bakery near the river.",
     "Which city did Mara Lindqvist move to?", "Lisbon"),
    ("The lighthouse keeper at Cape Verdell is a man named Tobias Reyne; he has kept the light since 2001.",
     "What is the name of the lighthouse keeper?", "Tobias Reyne"),
    ("The warehouse in Dayton stores 4,200 pallets of rice and ships to twelve stores.",
     "How many pallets of rice does the warehouse store?", "4,200"),
]


def test_ask_answers_short_factual_contexts_over_int8_cards(services):
    correct = []
    for context, question, gold in FACTS:
        answer = ask(services.sender, context, question, codec="int8")
        s = answer.stats
        assert s.codec == "int8" and s.context_tokens > 10 and s.wire_bytes > 0
        assert s.kv_fp16_bytes == s.context_tokens * 30 * 2 * 3 * 64 * 2  # 23,040 B/token, all layers
        assert s.compression_ratio == pytest.approx(s.kv_fp16_bytes / s.wire_bytes)
        assert s.ttft_s > 0 and s.generated_tokens > 0
        correct.append(gold.lower() in answer.text.lower())
    assert sum(correct) >= 4, correct


def test_text_handoff_ships_the_text_and_answers_like_a_lossless_card(services):
    context, question, gold = FACTS[0]
    text = ask(services.sender, context, question, codec="text")
    card = ask(services.sender, context, question, codec="fp32")
    s = text.stats
    assert s.codec == "text" and not s.card_reused
    assert len(context) < s.wire_bytes < len(context) + 64  # the text and a few bytes of framing
    assert s.compression_ratio > 100 and s.prefill_s > 0 and s.quantize_s == 0
    assert s.context_tokens == card.stats.context_tokens
    assert text.text == card.text and gold in text.text
    again = ask(services.sender, context, question, codec="text")
    assert again.stats.card_reused and again.stats.wire_bytes == 0


def test_same_card_is_not_sent_twice(services):
    context, question, _ = FACTS[0]
    first = ask(services.sender, context + " Extra.", question, codec="fp16")
    second = ask(services.sender, context + " Extra.", question, codec="fp16")
    assert not first.stats.card_reused and second.stats.card_reused and second.stats.wire_bytes == 0
    assert second.text == first.text


@pytest.fixture(scope="module")
def card_frames(embedded):
    engine = SenderEngine(embedded)
    card = engine.prepare("The vault code is 7731. The vault is in Geneva.", "int8")
    return list(frames(card.header, card.blobs, chunk_bytes=64 << 10))


def _push_fails(stub, stream, code, match):
    with pytest.raises(grpc.RpcError) as err:
        stub.PushCard(push_requests(iter(stream)), timeout=60)
    assert err.value.code() == code, err.value.details()
    assert match in err.value.details()


def _still_serving(stub, card_frames):
    reply = stub.PushCard(push_requests(iter(card_frames)), timeout=60)
    assert stub.HasCard(pb.HasCardRequest(card_id=reply.card_id)).present


def test_bad_cards_get_clear_statuses_and_the_server_keeps_serving(services, receiver_stub, card_frames, embedded):
    stub = receiver_stub
    _push_fails(stub, card_frames[:3], grpc.StatusCode.DATA_LOSS, "truncated")
    _still_serving(stub, card_frames)

    bad_crc = [pb.CardFrame() for _ in card_frames]
    for dst, src in zip(bad_crc, card_frames):
        dst.CopyFrom(src)
    bad_crc[1].chunk.crc32c ^= 1
    _push_fails(stub, bad_crc, grpc.StatusCode.DATA_LOSS, "CRC32C")
    _still_serving(stub, card_frames)

    future = pb.CardFrame()
    future.CopyFrom(card_frames[0])
    future.header.format_version = FORMAT_VERSION + 7
    _push_fails(stub, [future, *card_frames[1:]], grpc.StatusCode.FAILED_PRECONDITION, "version")
    _still_serving(stub, card_frames)

    foreign = pb.CardFrame()
    foreign.CopyFrom(card_frames[0])
    foreign.header.model.weights_sha256 = "0" * 64
    foreign.header.model.name = "someone-else"
    _push_fails(stub, [foreign, *card_frames[1:]], grpc.StatusCode.FAILED_PRECONDITION, "someone-else")
    _still_serving(stub, card_frames)

    big = pb.CardFrame()
    big.CopyFrom(card_frames[1])
    big.chunk.data = bytes(MAX_CHUNK_BYTES + 1)
    _push_fails(stub, [card_frames[0], big], grpc.StatusCode.INVALID_ARGUMENT, "limit")
    _still_serving(stub, card_frames)

    huge = pb.CardFrame(chunk=pb.LayerChunk(data=bytes(4 << 20)))  # beyond the gRPC message ceiling
    _push_fails(stub, [card_frames[0], huge], grpc.StatusCode.RESOURCE_EXHAUSTED, "")
    _still_serving(stub, card_frames)


def test_generate_for_an_unknown_card(receiver_stub):
    with pytest.raises(grpc.RpcError) as err:
        list(receiver_stub.Generate(pb.GenerateRequest(card_id="f" * 64, query="Who?"), timeout=30))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "push it first" in err.value.details()
    assert not receiver_stub.HasCard(pb.HasCardRequest(card_id="f" * 64)).present


def test_empty_context_and_unknown_codec_are_invalid(services):
    for context, question, codec, match in [
        ("   ", "Who?", "", "context is empty"),
        ("Some text.", "", "", "question is empty"),
        ("Some text.", "Who?", "int3", "unknown codec"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            ask(services.sender, context, question, codec=codec)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in err.value.details()
    with pytest.raises(grpc.RpcError, match="facts go with KV cards only"):
        ask(services.sender, "Some text.", "Who?", codec="text", facts=True)  # refused, not silently dropped
    assert "600" in ask(services.sender, *FACTS[0][:2]).text  # and it still answers


def test_facts_ride_in_the_card_and_reach_the_receivers_prompt(services, embedded):
    context = ("Release notes for the Atlas API, version 4.2. The rate limit is 600 requests per minute per key. "
               "Bulk exports moved to the /v4/exports endpoint.")
    plain = ask(services.sender, context, "Which endpoint serves bulk exports?", codec="kivi-2")
    with_facts = ask(services.sender, context, "Which endpoint serves bulk exports?", codec="kivi-2", facts=True)
    s = with_facts.stats
    assert s.facts >= 3 and s.facts_s > 0
    assert s.card_id != plain.stats.card_id  # facts are part of the card's content
    # (the second card extends the first, held, as a delta: its header carries the facts of the whole context)
    assert with_facts.text != plain.text  # the receiver's prompt changed (tests/test_facts.py checks how)
    sender = SenderEngine(embedded)
    cards = [sender.prepare(context, "kivi-2", facts) for facts in (None, FactConfig())]
    assert cards[1].header.ByteSize() > cards[0].header.ByteSize() + 50  # and of its bytes on the wire


def test_health_and_reflection(services):
    for address, name in [(services.receiver, "qkvcomm.v1.ReceiverService"),
                          (services.sender, "qkvcomm.v1.SenderService")]:
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", name):
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            names = {s.name for s in reply.list_services_response.service}
            assert {name, "qkvcomm.v1.InfoService", "grpc.health.v1.Health"} <= names


def test_metrics_endpoints(services, embedded):
    ask(services.sender, FACTS[2][0], FACTS[2][1], codec="int8")
    sender = urllib.request.urlopen(f"http://127.0.0.1:{services.sender_metrics}/metrics").read().decode()
    receiver = urllib.request.urlopen(f"http://127.0.0.1:{services.receiver_metrics}/metrics").read().decode()

    def value(text, name):
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(name + " ") or line.startswith(name + "{"))

    assert value(sender, "qkvcomm_wire_bytes_sent_total") > 0
    assert value(sender, "qkvcomm_wire_bytes_sent_total") <= value(receiver, "qkvcomm_wire_bytes_received_total")
    assert value(sender, "qkvcomm_cards_sent_total") >= 1
    assert value(sender, "qkvcomm_compression_ratio_count") >= 1
    for stage in ("prefill", "quantize", "transfer"):
        assert f'qkvcomm_stage_seconds_count{{stage="{stage}"}}' in sender
    assert 'qkvcomm_stage_seconds_count{stage="dequantize"}' in receiver
    assert value(receiver, "qkvcomm_cards_held") >= 1
    # as serving engines export them: the model, requests by method and status, tokens, TTFT once per service
    model = f'model_name="{embedded.fingerprint.name}"'
    assert f'qkvcomm_model_info{{{model}' in receiver and 'role="receiver"' in receiver
    oks = [line for line in sender.splitlines()
           if line.startswith("qkvcomm_requests_total{") and 'method="Ask"' in line]
    assert any('status="OK"' in line and float(line.split()[-1]) >= 1 for line in oks)
    assert any('status="INVALID_ARGUMENT"' in line for line in oks)  # the refused asks of other tests
    assert value(receiver, "qkvcomm_generation_tokens_total") >= 1 and value(sender, "qkvcomm_prompt_tokens_total") >= 1
    assert value(receiver, "qkvcomm_time_to_first_token_seconds_count") >= 1
    assert value(sender, "qkvcomm_ask_time_to_first_token_seconds_count") >= 1
    assert "qkvcomm_time_to_first_token_seconds_count" not in sender and 'stage="ttft"' not in sender + receiver
    assert value(sender, "qkvcomm_requests_in_flight") == 0 and value(receiver, "qkvcomm_requests_in_flight") == 0


def test_health_check_command_sees_serving_and_absent_servers(services):
    from qkvcomm_client import ReceiverClient, SenderClient

    from qkvcomm_cli.main import main

    with ReceiverClient(services.receiver) as receiver, SenderClient(services.sender) as sender:
        assert receiver.healthy() and sender.healthy()
    assert main(["health", "--address", services.sender]) == 0
    with ReceiverClient("127.0.0.1:1") as absent:
        assert not absent.healthy(timeout_s=0.5)
    assert main(["health", "--address", "127.0.0.1:1"]) == 1


def test_layer_selection_over_grpc_sends_half_the_layers(services):
    context, question, gold = FACTS[0]
    full = ask(services.sender, context, question, codec="fp16").stats
    half = ask(services.sender, context, question, codec="fp16", layer_ratio=0.5, layer_method="prior")
    assert half.stats.card_id != full.card_id
    assert 0.45 < half.stats.wire_bytes / full.wire_bytes < 0.55  # 15 of 30 layers, nothing for the rest
    assert half.text.strip()  # the receiver answers over its ragged cache
    with pytest.raises(grpc.RpcError, match="unknown layer selection"):
        ask(services.sender, context, question, layer_ratio=0.5, layer_method="best")


def test_more_concurrent_generations_than_worker_threads_on_a_layer_selected_card(services, receiver_stub):
    """12 generations at once on a ragged (layer-selected) cache, more than the servers' worker
    threads (min(32, cores + 4)): all complete, with the same answer each (a per-process attention
    switch held across token streams used to wedge the receiver for good here)."""
    from concurrent.futures import ThreadPoolExecutor

    context, question, _ = FACTS[1]
    first = ask(services.sender, context, question, codec="fp16", layer_ratio=0.5, layer_method="prior")
    card_id = first.stats.card_id
    request = pb.GenerateRequest(card_id=card_id, query=question, max_new_tokens=12)

    def generate(_):
        return "".join(r.text for r in receiver_stub.Generate(request, timeout=240) if not r.HasField("stats"))

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(generate, range(12)))
    assert len(answers) == 12 and len(set(answers)) == 1 and answers[0].strip()
    assert receiver_stub.HasCard(pb.HasCardRequest(card_id=card_id), timeout=10).present  # and it still serves


def test_each_service_exports_its_own_series_at_metrics_only(services):
    import urllib.error

    sender = urllib.request.urlopen(f"http://127.0.0.1:{services.sender_metrics}/metrics").read().decode()
    receiver = urllib.request.urlopen(f"http://127.0.0.1:{services.receiver_metrics}/metrics").read().decode()
    for own, other, names in ((receiver, sender, ("qkvcomm_cards_held", "qkvcomm_intakes_in_flight",
                                                 "qkvcomm_wire_bytes_received_total")),
                              (sender, receiver, ("qkvcomm_wire_bytes_sent_total", "qkvcomm_cards_sent_total",
                                                  "qkvcomm_compression_ratio_count"))):
        assert all(f"\n{n}" in own for n in names) and not any(f"\n{n}" in other for n in names)
    for text in (sender, receiver):
        assert "_created" not in text and "\nprocess_resident_memory_bytes" in text and "python_info" in text
    for port in (services.sender_metrics, services.receiver_metrics):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/anything-else")
        assert e.value.code == 404


def test_every_call_is_one_access_line(services, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="qkvcomm.access"):
        ask(services.sender, FACTS[0][0], FACTS[0][1], codec="int8")
        with pytest.raises(grpc.RpcError):
            ask(services.sender, FACTS[0][0], FACTS[0][1], codec="no-such-codec")
        import time

        def logged() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "qkvcomm.access"]

        def refused(line: str) -> bool:
            return line.startswith("sender Ask INVALID_ARGUMENT ") and "no-such-codec" in line

        deadline = time.monotonic() + 10  # a call's line is written as it ends, just after the client has its status
        while not any(map(refused, logged())) and time.monotonic() < deadline:
            time.sleep(0.05)
    lines = logged()
    assert any(line.startswith("sender Ask OK ") and " ms tenant=-" in line for line in lines)
    assert any(line.startswith("receiver Generate OK ") for line in lines)
    assert any(refused(line) and "reason=invalid" in line for line in lines)
