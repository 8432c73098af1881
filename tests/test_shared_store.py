"""The Redis tier against a real redis-server that this test starts (Debian's package; `make test`
installs it where it may): receivers share cards, survive Redis going away, and never serve a
corrupt or foreign-key entry."""
from __future__ import annotations

import os
import time

import pytest
import redis

from qkv_core.card.framing import frames
from qkv_core.config import StoreConfig
from qkv_core.engine.answering import Generation
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.sender import SenderEngine
from qkv_core.store import redis as redis_tier
from qkv_eval.redis_server import RedisServer, available

pytestmark = pytest.mark.skipif(not available(), reason="redis-server is not installed (Debian's redis-server package)")
VAULT = "The vault code is 7731. The vault is in Geneva, under the old observatory."


@pytest.fixture
def server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def quick_retry(monkeypatch):
    monkeypatch.setattr(redis_tier, "RETRY_S", 0.2)


def _pair(lm, url: str, **store):
    return [ReceiverEngine(lm, StoreConfig(store_redis=url, **store)) for _ in range(2)]


def _push(receiver, card, tenant=""):
    return receiver.accept(frames(card.header, card.blobs), tenant=tenant)


def test_a_card_pushed_to_one_receiver_answers_through_another(embedded, server):
    a, b = _pair(embedded, server.url)
    card = SenderEngine(embedded).prepare(VAULT, "kivi-4")
    _push(a, card, tenant="alice")
    assert b.store.has(card.header.card_id, "bob") is None  # tenants stay apart in Redis too
    answer = "".join(b.generate(card.header.card_id, "What is the vault code?", 12, False, Generation(""), "alice"))
    assert "7731" in answer
    assert b.store.stats.get("redis", "hit") == 1 and b.store.stats.get("redis", "reload") == 1


def test_receivers_keep_serving_their_own_cards_while_redis_is_down(tiny, server):
    a, b = _pair(tiny, server.url)
    sender = SenderEngine(tiny)
    first, second, third = (sender.prepare(f"Depot {i} holds {100 + i} crates. " * 8, "kivi-4") for i in range(3))
    _push(a, first)
    _push(b, second)
    server.stop()
    assert a.store.get(first.header.card_id) is not None and b.store.get(second.header.card_id) is not None
    _push(a, third)  # accepted and served locally; the write to Redis fails and is counted
    assert a.store.get(third.header.card_id) is not None
    assert b.store.get(third.header.card_id) is None  # only in A's memory: B cannot know it
    assert not a.store.stats.up["redis"] and a.store.stats.get("redis", "error") >= 1
    server.start()  # an empty Redis comes back: the tier recovers by itself
    time.sleep(0.3)
    _push(a, sender.prepare("Depot 9 holds 7 crates. " * 8, "kivi-4"))
    assert a.store.stats.up["redis"]


def test_a_corrupt_redis_entry_is_detected_dropped_and_counted(tiny, server):
    a, b = _pair(tiny, server.url)
    card = SenderEngine(tiny).prepare("Depot 4 holds 104 crates. " * 8, "kivi-4")
    _push(a, card)
    client = redis.Redis.from_url(server.url)
    name = b.store.tier("redis").key(("", card.header.card_id))
    client.setrange(f"{name}:0", 200, b"\xff\x00\xff")
    assert b.store.get(card.header.card_id) is None
    assert b.store.stats.get("redis", "corrupt") == 1 and not client.exists(name)


def test_a_wrong_store_key_is_detected(tiny, server, tmp_path):
    keys = []
    for name in ("a", "b"):
        path = tmp_path / name
        path.write_text(os.urandom(32).hex())
        keys.append(str(path))
    a = ReceiverEngine(tiny, StoreConfig(store_redis=server.url, store_key=keys[0]))
    b = ReceiverEngine(tiny, StoreConfig(store_redis=server.url, store_key=keys[1]))
    card = SenderEngine(tiny).prepare("Depot 5 holds 105 crates. " * 8, "kivi-4")
    _push(a, card)
    key = ("", card.header.card_id)
    assert b.store.get(card.header.card_id) is None  # another key names it otherwise: not even found
    client = redis.Redis.from_url(server.url)
    for suffix in ("", ":0"):  # moved where b's key looks: it does not open
        client.set(b.store.tier("redis").key(key) + suffix, client.get(a.store.tier("redis").key(key) + suffix))
    assert b.store.get(card.header.card_id) is None and b.store.stats.get("redis", "corrupt") == 1


def test_the_receiver_reports_redis_down_in_health_and_metrics_and_keeps_serving(tiny, server):
    import asyncio
    import dataclasses
    import urllib.request

    import grpc
    from conftest import TEST_CONFIG
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from qkvcomm.v1 import services_pb2_grpc

    from qkv_core.wire import pb
    from receiver_service.server import start_receiver

    cfg = dataclasses.replace(TEST_CONFIG, store=StoreConfig(store_redis=server.url))

    def probe(port: int, metrics_port: int) -> tuple[int, int, bool, str]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = services_pb2_grpc.ReceiverServiceStub(channel)
            held = stub.HasCard(pb.HasCardRequest(card_id="0" * 64), timeout=10)
            overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            tier = health.Check(health_pb2.HealthCheckRequest(service="qkvcomm.store.redis"), timeout=5).status
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        up = next(line for line in text.splitlines() if line.startswith('qkvcomm_store_tier_up{tier="redis"}'))
        return overall, tier, held.present, up

    async def scenario():
        running = await start_receiver(cfg, tiny)
        try:
            before = await asyncio.to_thread(probe, running.port, running.metrics_port)
            server.stop()
            after = await asyncio.to_thread(probe, running.port, running.metrics_port)
            await asyncio.sleep(0.1)  # the health update is scheduled from the worker thread
            return before, await asyncio.to_thread(probe, running.port, running.metrics_port), after
        finally:
            await running.stop(0)

    before, after, first_miss = asyncio.run(scenario())
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert before[:3] == (serving, serving, False) and before[3].endswith(" 1.0")
    assert not first_miss[2]  # the lookup that met the dead Redis answered: absent
    assert after[:3] == (serving, not_serving, False) and after[3].endswith(" 0.0")


def test_a_sender_balancing_over_two_receivers_that_share_redis_answers_every_question(embedded, server):
    """round_robin spreads a card's calls over both receivers: the shared tier is what lets the one
    that did not take the push answer on it (and each receiver answers on every card)."""
    import dataclasses

    from conftest import TEST_CONFIG, ask, gauge, service_loop
    from qkvcomm_client import ReceiverClient

    from receiver_service.server import start_receiver
    from sender_service.server import start_sender

    cfg = dataclasses.replace(TEST_CONFIG, store=StoreConfig(store_redis=server.url))
    with service_loop() as run:
        receivers = [run(start_receiver(cfg, embedded)) for _ in range(2)]
        target = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in receivers)
        balanced = dataclasses.replace(TEST_CONFIG, receiver=target, receiver_balance="round_robin")
        sender, channel = run(start_sender(balanced, embedded))
        try:
            cards = []
            for i, code in enumerate(("7731", "4052", "9186", "2640")):
                context = f"Vault {i} is in Geneva. The code of vault {i} is {code}."
                answer = ask(f"127.0.0.1:{sender.port}", context, f"What is the code of vault {i}?", codec="int8")
                assert code in answer.text, (i, answer.text)
                cards.append((i, code, answer.stats.card_id))
            for r in receivers:
                with ReceiverClient(f"127.0.0.1:{r.port}") as client:
                    for i, code, card_id in cards:
                        assert code in client.generate(card_id, f"What is the code of vault {i}?").text
            pushed = [gauge(r.metrics_port, "qkvcomm_cards_received_total") for r in receivers]
            shared = [gauge(r.metrics_port, "qkvcomm_store_events_total", event="hit", tier="redis") for r in receivers]
            assert sum(pushed) == 4 and sum(shared) >= 4 - min(pushed), (pushed, shared)
        finally:
            run(sender.stop(0))
            run(channel.close())
            for r in receivers:
                run(r.stop(0))
