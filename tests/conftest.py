"""Shared fixtures: a tiny random Llama (unit tests), the embedded model and live gRPC services."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import urllib.request
from collections.abc import Callable, Iterator

import _triton_mode  # noqa: F401 - before transformers imports triton
import grpc
import pytest
import torch
from qkvcomm.v1 import services_pb2_grpc
from qkvcomm_client import Answer, ClientTLS, SenderClient
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from qkv_core.card.framing import frames
from qkv_core.card.header import CardPlan, build_card
from qkv_core.card.naming import name_card
from qkv_core.codec import allocation
from qkv_core.codec.encoding import reconstructed
from qkv_core.codec.registry import LayerCodec, resolve
from qkv_core.config import Limits, RuntimeConfig, ServiceConfig, data_dir
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.sender import SenderEngine
from qkv_core.errors import CardError, ErrorKind
from qkv_core.model.kv import prefill
from qkv_core.model.loaded import LoadedModel
from qkv_core.model.loading import load_model, wrap
from qkv_core.model.prompt import encode
from qkv_core.types import Fingerprint, KVCache
from qkv_core.wire import pb
from service_common.certs import DevCerts
from service_common.server import GRPC_OPTIONS

QA_DIR = data_dir()
CORPUS = [
    "The rate limit is 600 requests per minute. The city of Lyon hosts the summit on 4 May 2025.",
    "Context: a quick brown fox jumps over the lazy dog. Question: what jumps? Answer: the fox.",
    "Bulk exports moved to the /v4/exports endpoint; maintenance is every Sunday at 02:00 UTC.",
]


def ask(sender: str, context: str, question: str, *, tls: ClientTLS = ClientTLS(), token: str = "",
        tenant: str = "", timeout_s: float = 600.0, **settings) -> Answer:
    """One Ask through the light client, on a channel of its own."""
    with SenderClient(sender, tls=tls, token=token, tenant=tenant, timeout_s=timeout_s) as client:
        return client.ask(context, question, **settings)


def card_round_trip(
    lm: LoadedModel, kv: KVCache, ids: list[int], codec_name: str, sender: SenderEngine | None = None,
    importance: torch.Tensor | None = None,
) -> KVCache:
    """Encode `kv` as a card and take it in through the receiver engine: the receiver's real path."""
    sender = sender or SenderEngine(lm)
    plan = sender.allocate(sender.codec(codec_name), kv, importance)
    receiver = ReceiverEngine(lm)
    return receiver.accept(frames(*build_card(lm.fingerprint, ids, kv, plan))).kv


def qa_rows(name: str, limit: int) -> list[dict]:
    with open(QA_DIR / name) as f:
        return [json.loads(line) for _, line in zip(range(limit), f)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def synthetic_profile(layers: int = 30, seed: int = 0, dropped: list[float] | None = None) -> allocation.Profile:
    """A profile whose errors and next-token KL fall x4 per bit, each layer's K and V scale random;
    `dropped`: the KL of dropping each layer (none: layers are never dropped)."""
    g = torch.Generator().manual_seed(seed)
    scale = {k: torch.rand(layers, generator=g).add(0.1).tolist() for k in allocation.KINDS}
    kl = {k: {str(b): [a * 4.0 ** -b for a in scale[k]] for b in allocation.BITS} for k in allocation.KINDS}
    return allocation.Profile("synthetic", "0" * 64, 1, 1, {f: kl for f in allocation.FAMILIES}, kl,
                              dropped=dropped or [])


def tiny_model(seed: int = 0, layers: int = 3, head_dim: int = 16) -> LoadedModel:
    """A randomly initialised 3-layer Llama (2 KV heads x 16) that runs in milliseconds."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=1024,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return wrap(f"tiny-llama-{seed}", LlamaForCausalLM(config), tokenizer)


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return tiny_model()


@pytest.fixture(scope="session")
def embedded() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct, loaded once per test session, fp32 on CPU."""
    return load_model(RuntimeConfig(device="cpu", dtype="float32"))


@dataclasses.dataclass
class Services:
    receiver: str
    sender: str
    receiver_metrics: int
    sender_metrics: int


@contextlib.contextmanager
def service_loop() -> Iterator[Callable]:
    """A background event loop for in-process services; yields `run(coroutine)`, which waits for it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@contextlib.contextmanager
def serve_pair(lm: LoadedModel, receiver_cfg: ServiceConfig, sender_cfg: ServiceConfig,
               sender_lm: LoadedModel | None = None) -> Iterator[Services]:
    """A real Receiver and Sender (of `sender_lm`, if given) on loopback gRPC, served from a
    background event loop; the sender's `receiver` setting is filled in."""
    from receiver_service.server import start_receiver
    from sender_service.server import start_sender

    with service_loop() as run:
        receiver = run(start_receiver(receiver_cfg, lm))
        sender, channel = run(start_sender(dataclasses.replace(sender_cfg, receiver=f"127.0.0.1:{receiver.port}"),
                                           sender_lm or lm))
        try:
            yield Services(f"127.0.0.1:{receiver.port}", f"127.0.0.1:{sender.port}", receiver.metrics_port,
                           sender.metrics_port)
        finally:
            run(sender.stop(1))
            run(channel.close())
            run(receiver.stop(1))


# A short idle timeout, so the test of streams that stall after their header runs in seconds; no start-up
# speed measurement (the codec auto tests turn it on); the receiver's bulk channel on, so every handoff
# of the live pairs sends its card data there (the sender's default when a receiver offers one).
TEST_CONFIG = ServiceConfig(host="127.0.0.1", port=0, metrics_port=0, bulk_port=-1, max_new_tokens=24,
                            performance_tokens=0, limits=Limits(idle_timeout_s=3.0))


@pytest.fixture(scope="session")
def services(embedded: LoadedModel) -> Iterator[Services]:
    """The plaintext pair, as `make run` starts it."""
    with serve_pair(embedded, TEST_CONFIG, TEST_CONFIG) as pair:
        yield pair


TOKENS = {"alice": "alice-token-3f9c", "bob": "bob-token-81d2", "*": "relay-token-5e07"}


@dataclasses.dataclass
class SecureServices(Services):
    certs: DevCerts


@pytest.fixture(scope="session")
def secure_services(embedded: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureServices]:
    """The pair as a deployment runs it: both serve TLS with certificates made now; the receiver
    requires client certificates (mTLS) and takes the sender's relay token; the sender takes the
    tokens of tenants alice and bob."""
    from service_common.certs import make_dev_certs

    root = tmp_path_factory.mktemp("secure")
    certs = make_dev_certs(root / "certs")
    tokens = certs.write_tokens(TOKENS)
    tls = dict(tls_cert=str(certs.cert("server")), tls_key=str(certs.key("server")), auth_tokens=str(tokens))
    receiver_cfg = dataclasses.replace(TEST_CONFIG, **tls, tls_client_ca=str(certs.ca))
    sender_cfg = dataclasses.replace(
        TEST_CONFIG, **tls, receiver_ca=str(certs.ca), receiver_cert=str(certs.cert("client")),
        receiver_key=str(certs.key("client")), receiver_token=TOKENS["*"],
    )
    with serve_pair(embedded, receiver_cfg, sender_cfg) as pair:
        yield SecureServices(**dataclasses.asdict(pair), certs=certs)


@pytest.fixture(scope="session")
def receiver_stub(services: Services) -> Iterator[services_pb2_grpc.ReceiverServiceStub]:
    """A client stub of the live receiver (one channel for the session)."""
    with grpc.insecure_channel(services.receiver, options=GRPC_OPTIONS) as channel:
        yield services_pb2_grpc.ReceiverServiceStub(channel)


def gauge(port: int, name: str, **labels: str) -> float:
    """One metric's value from a service's /metrics endpoint; with `labels` (in the metric's label
    exposition order: alphabetical), that series, 0 while it has not appeared."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    series = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    values = [float(line.split()[1]) for line in text.splitlines() if line.startswith(series + " ")]
    if not values and not labels:
        raise KeyError(f"no metric {name} at port {port}")
    return values[0] if values else 0.0


@dataclasses.dataclass
class ToolCard:
    """A card of a short fixed context coded with one codec name, and what a receiver got from it."""

    fp: Fingerprint
    ids: list[int]
    kv: KVCache  # the sender's cache
    header: pb.CardHeader
    blobs: list[bytes]
    got: KVCache  # the receiver's
    codec: LayerCodec  # the name's codecs of one layer (static names: every layer's)

    def expected(self, kind: str, layer: int) -> torch.Tensor:
        """What the receiver should get back for one layer's K ("key") or V: the codec's round trip."""
        tensor, codec = (self.kv.keys if kind == "key" else self.kv.values)[layer], getattr(self.codec, kind)
        return reconstructed([tensor], [codec], self.fp, len(self.ids))[0]


def tool_card(lm: LoadedModel, name: str) -> ToolCard:
    ids = encode(lm.tokenizer, "The summit is in Lyon on 4 May. The rate limit is 600 requests per minute.")
    kv, _ = prefill(lm, ids)
    header, blobs = build_card(lm.fingerprint, ids, kv, CardPlan(name, resolve(name, lm.num_layers)))
    return ToolCard(lm.fingerprint, ids, kv, header, blobs, ReceiverEngine(lm).accept(frames(header, blobs)).kv,
                    resolve(name, 1)[0])


def expect_invalid(lm: LoadedModel, header: pb.CardHeader, blobs: list[bytes], match: str) -> None:
    """A tampered card, named again for its content as any client can, is an INVALID card whose
    error says `match`."""
    name_card(header, blobs)
    with pytest.raises(CardError, match=match) as err:
        ReceiverEngine(lm).accept(frames(header, blobs))
    assert err.value.kind == ErrorKind.INVALID


def replaced(header: pb.CardHeader, **fields) -> pb.CardHeader:
    """A copy of `header` with `fields` replaced (a list replaces a repeated field)."""
    out = pb.CardHeader()
    out.CopyFrom(header)
    for name, value in fields.items():
        if isinstance(value, list):
            del getattr(out, name)[:]
            getattr(out, name).extend(value)
        else:
            setattr(out, name, value)
    return out


def resigned(card, **fields) -> pb.CardHeader:
    """`card`'s header with `fields` replaced, named again by its content: a sender that means what
    it sends, only the reader's checks stand in between."""
    header = replaced(card.header, **fields)
    name_card(header, card.blobs)
    return header
