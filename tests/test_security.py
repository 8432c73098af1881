"""TLS, mutual TLS, tokens and tenants, against real services with certificates made at test time."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil

import grpc
import pytest
from conftest import TEST_CONFIG, TOKENS, ask
from grpc_health.v1 import health_pb2, health_pb2_grpc
from qkvcomm.v1 import services_pb2_grpc
from qkvcomm_client import ClientTLS, call_metadata, error_info, open_channel

from qkv_core.card.framing import frames
from qkv_core.codec import registry as codecs
from qkv_core.engine.sender import SenderEngine
from qkv_core.wire import pb, push_requests
from service_common.auth import Auth, Denied, parse_tokens
from service_common.certs import make_dev_certs
from service_common.server import GRPC_OPTIONS

pytestmark = pytest.mark.e2e
CONTEXT = "The vault code is 7731. The vault is in Geneva, under the old observatory."
QUESTION = "What is the vault code?"


def _tls(s, client: bool = False) -> ClientTLS:
    certs = s.certs
    return ClientTLS(str(certs.ca), str(certs.cert("client")),
                     str(certs.key("client"))) if client else ClientTLS(str(certs.ca))


def _code(call) -> grpc.StatusCode:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def _receiver(s, tenant: str, tls: ClientTLS | None = None):  # noqa: ANN202
    """A receiver stub calling as `tenant` (its own token) over mTLS."""
    channel = open_channel(s.receiver, tls or _tls(s, client=True), GRPC_OPTIONS)
    return channel, services_pb2_grpc.ReceiverServiceStub(channel), call_metadata(TOKENS[tenant], "")


def test_a_tls_handoff_with_a_token_answers(secure_services):
    s = secure_services
    answer = ask(s.sender, CONTEXT, QUESTION, codec="int8", tls=_tls(s), token=TOKENS["alice"])
    assert "7731" in answer.text and answer.stats.wire_bytes > 0


def test_plaintext_and_untrusted_clients_are_refused(secure_services, tmp_path):
    s = secure_services
    plain = lambda: ask(s.sender, CONTEXT, QUESTION, token=TOKENS["alice"], timeout_s=5)  # noqa: E731
    assert _code(plain) == grpc.StatusCode.UNAVAILABLE
    # mTLS: the receiver takes no client without a certificate, nor one from another CA
    stranger = make_dev_certs(tmp_path / "other")
    for tls in (ClientTLS(str(s.certs.ca)),
                ClientTLS(str(s.certs.ca), str(stranger.cert("client")), str(stranger.key("client")))):
        channel, stub, md = _receiver(s, "alice", tls)
        with channel:
            assert _code(lambda: stub.HasCard(pb.HasCardRequest(card_id="0" * 64), metadata=md, timeout=5)) \
                == grpc.StatusCode.UNAVAILABLE
    # a server certificate from another CA is not trusted by the client either
    assert _code(lambda: ask(s.sender, CONTEXT, QUESTION, tls=ClientTLS(str(stranger.ca)), token=TOKENS["alice"],
                             timeout_s=5)) == grpc.StatusCode.UNAVAILABLE


def test_tokens_are_required_and_checked(secure_services):
    s = secure_services
    for token in ("", "alice-token-3f9d", TOKENS["alice"] + "x"):
        with pytest.raises(grpc.RpcError) as err:
            ask(s.sender, CONTEXT, QUESTION, tls=_tls(s), token=token, timeout_s=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and error_info(err.value).reason == "UNAUTHENTICATED"
    channel, stub, _ = _receiver(s, "alice")
    with channel:
        assert _code(lambda: stub.HasCard(pb.HasCardRequest(card_id="0" * 64),
                                          timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        # a tenant's token may not act for another tenant; the relay's may
        for_bob = call_metadata(TOKENS["alice"], "bob")
        assert _code(lambda: stub.HasCard(pb.HasCardRequest(card_id="0" * 64), metadata=for_bob, timeout=5)) \
            == grpc.StatusCode.PERMISSION_DENIED
        assert not stub.HasCard(pb.HasCardRequest(card_id="0" * 64), metadata=call_metadata(TOKENS["*"], "bob")).present
        # health stays open: probes carry no token
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tenants_do_not_see_each_others_cards(secure_services):
    s = secure_services
    context = CONTEXT + " Only alice asked about this."
    card_id = ask(s.sender, context, QUESTION, codec="int8", tls=_tls(s), token=TOKENS["alice"]).stats.card_id
    channel, stub, alice = _receiver(s, "alice")
    bob = call_metadata(TOKENS["bob"], "")
    with channel:
        assert stub.HasCard(pb.HasCardRequest(card_id=card_id), metadata=alice).present
        assert not stub.HasCard(pb.HasCardRequest(card_id=card_id), metadata=bob).present
        query = pb.GenerateRequest(card_id=card_id, query="Repeat the context.", max_new_tokens=8)
        assert _code(lambda: list(stub.Generate(query, metadata=bob, timeout=30))) == grpc.StatusCode.NOT_FOUND
    # bob asking about the same context gets no reuse of alice's card: his own card is pushed
    again = ask(s.sender, context, QUESTION, codec="int8", tls=_tls(s), token=TOKENS["bob"]).stats
    assert again.card_id == card_id and not again.card_reused and again.wire_bytes > 0
    mine = ask(s.sender, context, QUESTION, codec="int8", tls=_tls(s), token=TOKENS["alice"]).stats
    assert mine.card_reused


def test_a_forged_card_neither_replaces_a_card_nor_reaches_another_tenant(secure_services, embedded):
    s = secure_services
    engine = SenderEngine(embedded)
    real = engine.prepare(CONTEXT, "int8")
    forged = engine.prepare("The vault code is 5000. The vault is in Geneva, under the old observatory.", "int8")
    forged.header.card_id = real.header.card_id
    channel, stub, alice = _receiver(s, "alice")
    with channel:
        stub.PushCard(push_requests(frames(real.header, real.blobs)), metadata=alice)
        for tenant in ("alice", "bob"):
            code = _code(lambda: stub.PushCard(push_requests(frames(forged.header, forged.blobs)),
                                               metadata=call_metadata(TOKENS[tenant], "")))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
        query = pb.GenerateRequest(card_id=real.header.card_id, query=QUESTION, max_new_tokens=12)
        answer = "".join(r.text for r in stub.Generate(query, metadata=alice))
        assert "7731" in answer and "5000" not in answer
        assert not stub.HasCard(pb.HasCardRequest(card_id=real.header.card_id),
                                metadata=call_metadata(TOKENS["bob"], "")).present


def test_requests_name_codecs_not_files(secure_services, tmp_path):
    """A valid codec file on the sender's disk is refused by path, with the same words as a file
    that does not exist: nothing is opened and nothing tells which paths exist."""
    s = secure_services
    real = tmp_path / "int8.json"
    codecs.save_layers(real, codecs.resolve("int8", 30))
    messages = set()
    for name in (str(real), "/etc/passwd.json", "/nonexistent/x.json"):
        with pytest.raises(grpc.RpcError) as err:
            ask(s.sender, CONTEXT, QUESTION, codec=name, tls=_tls(s), token=TOKENS["alice"])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        messages.add(err.value.details().replace(name, "NAME"))
    assert len(messages) == 1 and "codec_files" in messages.pop()
    files = codecs.codec_files([str(real)])
    assert codecs.resolve(str(real), 30, files) == codecs.resolve("int8", 30)  # one the configuration lists is read


def test_a_rotated_certificate_is_served_without_restart(tiny, tmp_path):
    from receiver_service.server import start_receiver

    live = make_dev_certs(tmp_path / "live")
    cfg = dataclasses.replace(TEST_CONFIG, metrics_port=-1, tls_cert=str(live.cert("server")),
                              tls_key=str(live.key("server")))

    def serving(port: int, ca: str) -> bool:
        with open_channel(f"127.0.0.1:{port}", ClientTLS(ca)) as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                return True
            except grpc.RpcError:
                return False

    async def scenario() -> tuple[bool, bool, bool]:
        running = await start_receiver(cfg, tiny)
        try:
            before = await asyncio.to_thread(serving, running.port, str(live.ca))
            rotated = make_dev_certs(tmp_path / "next")
            kept_ca = tmp_path / "old-ca.crt"
            shutil.copy(live.ca, kept_ca)
            for name in ("server.crt", "server.key"):  # what cert-manager does to the mounted files
                shutil.copy(rotated.directory / name, live.directory / name)
            return (before, await asyncio.to_thread(serving, running.port, str(rotated.ca)),
                    await asyncio.to_thread(serving, running.port, str(kept_ca)))
        finally:
            await running.stop(0)

    before, new_trusted, old_trusted = asyncio.run(scenario())
    assert before and new_trusted and not old_trusted


def test_a_plaintext_port_off_loopback_is_warned_about(tiny, caplog):
    from receiver_service.server import start_receiver

    async def scenario() -> None:
        running = await start_receiver(dataclasses.replace(TEST_CONFIG, host="0.0.0.0", metrics_port=-1), tiny)
        await running.stop(0)

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert any("without TLS" in r.getMessage() for r in caplog.records)


def test_token_file_rules(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# comment\n\ns3cret alice\nrelay *\n")
    auth = Auth(str(path))
    assert auth.tenant([("authorization", "Bearer s3cret")]) == "alice"
    assert auth.tenant([("authorization", "bearer s3cret"), ("x-qkvcomm-tenant", "alice")]) == "alice"
    assert auth.tenant(call_metadata("relay", "bob")) == "bob" and auth.tenant(call_metadata("relay", "")) == ""
    for metadata, code in (([], grpc.StatusCode.UNAUTHENTICATED),
                           (call_metadata("s3cre", ""), grpc.StatusCode.UNAUTHENTICATED),
                           ([("authorization", "Basic s3cret")], grpc.StatusCode.UNAUTHENTICATED),
                           (call_metadata("s3cret", "bob"), grpc.StatusCode.PERMISSION_DENIED),
                           (call_metadata("relay", "bad tenant!"), grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(Denied) as err:
            auth.tenant(metadata)
        assert err.value.code == code and "s3cret" not in str(err.value)
    path.write_text("n3w bob\n")  # rotated: read again without a restart
    assert auth.tenant(call_metadata("n3w", "")) == "bob"
    with pytest.raises(Denied):
        auth.tenant(call_metadata("s3cret", ""))
    with pytest.raises(ValueError, match="line 1") as err:
        parse_tokens("t0ken has three\n")
    assert "t0ken" not in str(err.value)
    assert Auth("").tenant([("x-qkvcomm-tenant", "carol")]) == "carol"  # no token file: the network is the gate
