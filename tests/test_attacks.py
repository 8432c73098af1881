"""The services probed from an attacker's side (issue 34): a tenant with a valid token of its own,
a holder of the receiver's port, a writer of Redis or of the disk. Each test first shows the
mechanism the attack used still works for its rightful user (so the test could see the leak),
then that it is closed to the attacker."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import statistics
import time

import grpc
import pytest
import redis
from conftest import TEST_CONFIG, TOKENS, resigned, serve_pair, service_loop
from qkvcomm.v1 import services_pb2_grpc
from qkvcomm_client import ClientTLS, PlaintextToken, SenderClient, call_metadata, check_token_transport

from qkv_core.card.blocks import block_hashes
from qkv_core.card.framing import frames
from qkv_core.config import Limits, StoreConfig
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.sender import Parent, SenderEngine
from qkv_core.engine.sessions import Sessions, held_bytes
from qkv_core.errors import CardError, ErrorKind
from qkv_core.wire import pb, push_requests
from qkv_eval.redis_server import RedisServer, available

DOC = ("The vault access code is 4410. The vault is in Geneva, under the old observatory. Staff enter by the "
       "north door after 09:00; visitors sign in at the desk. ")


def _client(s, tenant: str) -> SenderClient:
    return SenderClient(s.sender, tls=ClientTLS(str(s.certs.ca)), token=TOKENS[tenant], timeout_s=300)


def _share_prefill_s(s, tenant: str, context: str) -> float:
    with _client(s, tenant) as client:
        return client.share(context, codec="int8").prefill_s


def test_a_tenant_cannot_time_what_another_tenant_shared(secure_services):
    """After alice shares a text, bob sharing the same text prefills it in full, as a fresh text.
    alice's own repeat is still served from the context cache (the mechanism the attack timed)."""
    s, rounds = secure_services, 6
    after_alice, fresh, own_repeat = [], [], []
    for i in range(rounds):  # interleaved, so drift in the machine's speed falls on all three alike
        doc = f"Round {i} ({time.time_ns()}). " + DOC * 3
        other = f"Round {i} other ({time.time_ns()}). " + DOC.replace("vault", "depot") * 3
        _share_prefill_s(s, "alice", doc)
        after_alice.append(_share_prefill_s(s, "bob", doc))
        fresh.append(_share_prefill_s(s, "bob", other))
        own_repeat.append(_share_prefill_s(s, "alice", doc + " A note."))  # alice extends her own: a cached prefix

    def q(xs: list[float]) -> list[float]:
        return [round(v * 1e3, 1) for v in statistics.quantiles(xs, n=4)]

    logging.getLogger(__name__).info("prefill ms quartiles: bob after alice %s, bob fresh %s, alice's own repeat %s",
                                     q(after_alice), q(fresh), q(own_repeat))
    assert statistics.median(own_repeat) < 0.5 * statistics.median(fresh)  # the cache answers its own tenant fast
    assert min(after_alice) > 0.5 * statistics.median(fresh)  # and never another tenant: every round a full prefill
    assert 0.5 < statistics.median(after_alice) / statistics.median(fresh) < 2.0


def test_caches_that_answer_repeats_are_keyed_by_tenant(tiny):
    sender = SenderEngine(tiny, cache_bytes=1 << 30)
    ids = sender.context_ids(DOC * 2)
    kv, _ = sender.prefill(ids, tenant="alice")
    assert sender.prefill(ids, tenant="alice")[0] is kv  # alice's repeat: her cached entry
    assert sender.prefill(ids, tenant="bob")[0] is not kv  # bob's: computed for him
    assert sender._cached_prefix([("bob", h) for h in sender.block_hashes(ids + [5] * 40)], len(ids) + 40)[1] > 0
    assert sender._cached_prefix([("carol", h) for h in sender.block_hashes(ids + [5] * 40)], len(ids) + 40)[1] == 0
    from qkv_core.facts import FactConfig

    cfg = FactConfig("simple", 200)
    first = sender.facts.get(DOC, cfg, "alice")
    assert sender.facts.get(DOC, cfg, "alice") is first and sender.facts.get(DOC, cfg, "bob") is not first


@pytest.fixture
def redis_server(tmp_path):
    if not available():
        pytest.skip("redis-server is not installed (Debian's redis-server package)")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_a_card_id_that_is_no_id_is_refused_before_any_tier_and_redis_stays_up(tiny, redis_server):
    """HasCard("<own id>:0") used to read a data chunk as an index and mark the shared tier down
    for every tenant; ids are now checked at the RPC, and a bad entry is one bad entry."""
    cfg = dataclasses.replace(TEST_CONFIG, store=StoreConfig(store_redis=redis_server.url))
    card = SenderEngine(tiny).prepare(DOC, "kivi-4")
    with serve_pair(tiny, cfg, TEST_CONFIG) as s, grpc.insecure_channel(s.receiver) as channel:
        stub = services_pb2_grpc.ReceiverServiceStub(channel)
        stub.PushCard(push_requests(frames(card.header, card.blobs)), timeout=30)
        for bad in (f"{card.header.card_id}:0", "../../etc/passwd", card.header.card_id.upper(), ""):
            with pytest.raises(grpc.RpcError) as e:
                stub.HasCard(pb.HasCardRequest(card_id=bad), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(pb.GenerateRequest(card_id=bad, query="code?"), timeout=10))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert stub.HasCard(pb.HasCardRequest(card_id=card.header.card_id), timeout=10).present
        text = _metrics(s.receiver_metrics)
        assert 'qkvcomm_store_tier_up{tier="redis"} 1.0' in text


def _metrics(port: int) -> str:
    import urllib.request

    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_a_redis_writer_cannot_take_the_tier_down_stall_it_or_relabel_cards(tiny, redis_server):
    a, b = (ReceiverEngine(tiny, StoreConfig(store_redis=redis_server.url)) for _ in range(2))
    sender = SenderEngine(tiny)
    one, two = (sender.prepare(f"Depot {i} holds {100 + i} crates. " * 8, "kivi-4") for i in range(2))
    for card in (one, two):
        a.accept(frames(card.header, card.blobs))
    client = redis.Redis.from_url(redis_server.url)
    name_one, name_two = (a.store.tier("redis").key(("", c.header.card_id)) for c in (one, two))
    # a data chunk where the index should be: one bad entry, dropped and counted; the tier stays up
    client.set(name_two, client.get(f"{name_two}:0"))
    assert b.store.get(two.header.card_id) is None
    assert b.store.stats.get("redis", "corrupt") == 1 and b.store.stats.up["redis"]
    # an index claiming 1.5 million chunks: refused before anything is fetched
    a.store.tier("redis").put(("", two.header.card_id), a.store.memory.get(("", two.header.card_id)))
    client.set(name_two, f"1500000 {1_500_000 << 20} {'0' * 64}")
    start = time.perf_counter()
    assert b.store.get(two.header.card_id) is None
    assert time.perf_counter() - start < 1.0 and b.store.stats.get("redis", "corrupt") == 2
    # unsealed: card one's valid entry written under card two's name is refused, not served as two
    for suffix in ("", ":0"):
        client.set(name_two + suffix, client.get(name_one + suffix))
    assert b.store.get(two.header.card_id) is None and b.store.stats.get("redis", "corrupt") == 3
    assert b.store.get(one.header.card_id) is not None and b.store.stats.up["redis"]


def test_sealed_redis_entries_carry_keyed_names(tiny, redis_server, tmp_path):
    key = tmp_path / "key"
    key.write_text("ab" * 32)
    receiver = ReceiverEngine(tiny, StoreConfig(store_redis=redis_server.url, store_key=str(key)))
    card = SenderEngine(tiny).prepare(DOC, "kivi-4")
    receiver.accept(frames(card.header, card.blobs), tenant="alice")
    names = [k.decode() for k in redis.Redis.from_url(redis_server.url).keys("*")]
    assert names and all(card.header.card_id not in n and b"alice".hex() not in n for n in names)
    assert all(":sealed:" in n for n in names)


def _forged(lm, context: str, claimed: str):
    """A card of `context` that names the block hashes of `claimed` (re-signed: a valid card id)."""
    sender = SenderEngine(lm)
    card = sender.prepare(context, "int8")
    hashes = block_hashes(lm.fingerprint, sender.context_ids(claimed))[: len(card.header.block_hashes)]
    return card, resigned(card, block_hashes=hashes)


def test_forged_block_hashes_are_refused_and_never_found(tiny):
    """A card saying something else under the block hashes of a victim's document: refused, so
    FindPrefix can only answer with hashes the receiver computed from a card's own tokens."""
    lie = "The vault access code is 7731. " * 6
    card, forged = _forged(tiny, lie, DOC * 2)
    receiver = ReceiverEngine(tiny)
    with pytest.raises(CardError, match="block hashes") as e:
        receiver.accept(frames(forged, card.blobs), tenant="alice")
    assert e.value.kind == ErrorKind.INVALID
    victim = block_hashes(tiny.fingerprint, SenderEngine(tiny).context_ids(DOC * 2))
    assert receiver.find_prefix(victim, "alice") is None
    receiver.accept(frames(card.header, card.blobs), tenant="alice")  # the honest card is found by its own text
    own = block_hashes(tiny.fingerprint, SenderEngine(tiny).context_ids(lie + " More."))
    assert receiver.find_prefix(own, "alice") is not None and receiver.find_prefix(own, "bob") is None


def test_a_delta_must_extend_its_parents_context(tiny):
    sender, receiver = SenderEngine(tiny), ReceiverEngine(tiny)
    parent = sender.prepare(DOC * 2, "int8")
    receiver.accept(frames(parent.header, parent.blobs))
    tokens = 5 * 16  # past the chat template's head, which every context shares
    honest = sender.prepare(DOC * 2 + " Added.", "int8", parent=Parent(parent.header.card_id, tokens))
    receiver.accept(frames(honest.header, honest.blobs))  # a true extension is taken
    other = sender.prepare("The depot code is 9999. " * 12, "int8", parent=Parent(parent.header.card_id, tokens))
    with pytest.raises(CardError, match="does not begin with its parent") as e:
        receiver.accept(frames(other.header, other.blobs))
    assert e.value.kind == ErrorKind.INVALID


def test_a_token_never_travels_in_plaintext_off_loopback(caplog, tiny):
    for target in ("10.0.0.7:50062", "receiver.example:50061", "dns:///receivers:50061"):
        with pytest.raises(PlaintextToken, match="--ca"):
            check_token_transport(target, ClientTLS(), "secret-token")
        with pytest.raises(PlaintextToken):  # the client refuses before it opens a channel
            SenderClient(target, token="secret-token")
    for target in ("127.0.0.1:50062", "localhost:50062", "[::1]:50062", "unix:/run/qkv.sock"):
        check_token_transport(target, ClientTLS(), "secret-token")
    check_token_transport("10.0.0.7:50062", ClientTLS(ca="ca.crt"), "secret-token")  # TLS: fine
    check_token_transport("10.0.0.7:50062", ClientTLS(), "")  # no token: nothing to leak
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            check_token_transport("10.0.0.8:50062", ClientTLS(insecure=True), "secret-token")
    warned = [r for r in caplog.records if "plaintext" in r.getMessage()]
    assert len(warned) == 1 and "secret-token" not in caplog.text
    # the sender refuses to start with its relay token and a plaintext receiver off loopback
    from sender_service.server import start_sender

    cfg = dataclasses.replace(TEST_CONFIG, receiver="10.0.0.7:50061", receiver_token="relay")
    with service_loop() as run, pytest.raises(PlaintextToken):
        run(start_sender(cfg, tiny))


def test_info_reports_the_callers_tenant_only(secure_services):
    s = secure_services
    from qkvcomm_client import open_channel

    from service_common.server import GRPC_OPTIONS

    tls = ClientTLS(str(s.certs.ca), str(s.certs.cert("client")), str(s.certs.key("client")))
    with open_channel(s.receiver, tls, GRPC_OPTIONS) as channel:
        info = services_pb2_grpc.InfoServiceStub(channel)

        def free(tenant: str) -> int:
            return info.Info(pb.InfoRequest(), metadata=call_metadata(TOKENS["*"], tenant), timeout=10).store_free_bytes

        before = {t: free(t) for t in ("carol", "dave")}
        with _client(s, "alice") as client:  # alice's tenant pushes through the sender
            client.share(f"Carol and dave never see this ({time.time_ns()}). " + DOC, codec="fp16")
        assert free("carol") == before["carol"] and free("dave") == before["dave"]
        assert free("alice") < TEST_CONFIG.store.store_bytes


def test_sessions_count_the_memory_they_hold_and_cap_each_tenant():
    import tracemalloc

    sessions = Sessions(max_bytes=1 << 40, max_per_tenant=50)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            text = f"turn {i}"
            sessions.commit("alice" if i % 2 else f"t{i}", f"s{i}", sessions.context("x", f"s{i}", text), text)
        used = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    counted = sessions.nbytes
    assert len(sessions) == 1000 + 50  # alice keeps her newest 50; the others one each
    assert 0.7 < counted / used < 1.6, (counted, used)  # memory counted as held, not the text's bytes
    assert held_bytes("s", "a" * 100, "") > 100
    small = Sessions(max_bytes=50 * held_bytes("s00", "turn 00", "turn 00"))
    for i in range(100):
        small.commit("bob", f"s{i:02d}", f"turn {i:02d}", f"turn {i:02d}")
    assert 35 <= len(small) <= 50 and small.nbytes <= small.max_bytes


def test_a_stream_that_trickles_frames_is_dropped_at_the_intake_deadline(tiny):
    """Frames every 0.5 s keep the idle timeout (3 s) from firing; the overall deadline does not wait."""
    cfg = dataclasses.replace(TEST_CONFIG, limits=Limits(idle_timeout_s=3.0, intake_timeout_s=1.0))
    card = SenderEngine(tiny).prepare(DOC * 4, "fp16")

    async def trickle():
        for frame in frames(card.header, card.blobs):
            yield pb.PushCardRequest(frame=frame)
            await asyncio.sleep(0.5)

    async def push(address: str) -> tuple[grpc.StatusCode, float]:
        async with grpc.aio.insecure_channel(address) as channel:
            start = time.perf_counter()
            try:
                await services_pb2_grpc.ReceiverServiceStub(channel).PushCard(trickle(), timeout=30)
            except grpc.aio.AioRpcError as e:
                return e.code(), time.perf_counter() - start
        return grpc.StatusCode.OK, time.perf_counter() - start

    assert len(list(frames(card.header, card.blobs))) >= 4  # longer than the deadline at this pace
    with serve_pair(tiny, cfg, TEST_CONFIG) as s:
        code, took = asyncio.run(push(s.receiver))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and took < 3.0
