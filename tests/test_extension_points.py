"""The three extension points, each used from this module alone (no project file edited): a codec
tool, a store tier and an answer engine, each registered here and taken through a whole handoff
(qkv_core.engine.handoff) to a receiver in this process, over a port without gRPC."""
from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator

import pytest
import torch

from qkv_core.card.convert import fingerprint_to_pb
from qkv_core.card.framing import frames
from qkv_core.codec import tools
from qkv_core.codec.tensor_codec import TensorCodec
from qkv_core.config import ServiceConfig
from qkv_core.engine import answering
from qkv_core.engine.answering import AnswerEngine, Generation, register_answer_engine
from qkv_core.engine.handoff import Handoff
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.sender import SenderEngine
from qkv_core.store import tiered
from qkv_core.store.records import CardRecord, Key
from qkv_core.store.tier import Tier
from qkv_core.types import KVCache
from qkv_core.wire import pb

CONTEXT = " ".join(f"Depot {i} holds {100 + 7 * i} crates and opens at {i % 12 + 1} o'clock." for i in range(12))
TURN = " The summit moved to Lyon on 4 May."


class LocalReceiver:
    """The handoff's port (ReceiverPort) to a receiver engine in this process."""

    def __init__(self, engine: ReceiverEngine, tenant: str = ""):
        self.engine, self.tenant = engine, tenant
        self.pushed: list[pb.CardHeader] = []

    async def ready(self) -> None:
        return None

    async def info(self) -> pb.InfoResponse:
        features = pb.ServiceFeatures(sessions=not self.engine.answers.whole_cards_only)
        return pb.InfoResponse(model=fingerprint_to_pb(self.engine.lm.fingerprint), features=features)

    async def probe(self, payload: bytes) -> None:
        return None

    async def has_card(self, card_id: str) -> bool:
        return self.engine.store.has(card_id, self.tenant) is not None

    async def find_prefix(self, hashes: list[bytes], codecs: list[str]) -> pb.FindPrefixResponse:
        found = self.engine.find_prefix(hashes, self.tenant, codecs)
        return pb.FindPrefixResponse(card_id=found[0], tokens=found[1]) if found else pb.FindPrefixResponse()

    async def push_card(self, header: pb.CardHeader, blobs: list[bytes],
                        bulk: bool) -> tuple[pb.PushCardResponse, int]:
        stream = list(frames(header, blobs))
        stored = self.engine.accept(stream, tenant=self.tenant)  # CardError(PARENT_MISSING) passes through
        self.pushed.append(stored.header)
        return pb.PushCardResponse(card_id=stored.header.card_id), sum(f.ByteSize() for f in stream)

    async def push_text(self, request: pb.PushTextRequest) -> pb.PushTextResponse:
        card, prefill_s = self.engine.accept_text(request.context, self.tenant)
        return pb.PushTextResponse(card_id=card.header.card_id, prefill_s=prefill_s)

    def answer(self, card_id: str, question: str = "Which depot?") -> str:
        return "".join(self.engine.generate(card_id, question, 4, False, Generation(card_id), self.tenant))


def _share(handoff: Handoff, port: LocalReceiver, context: str, codec: str, session: str = "") -> pb.HandoffStats:
    return asyncio.run(handoff.share(pb.ShareRequest(context=context, codec=codec, session=session), port, ""))[0]


def _sender(tiny) -> Handoff:
    return Handoff(SenderEngine(tiny), ServiceConfig.from_env({}, role="sender"))


def test_a_handoff_runs_without_grpc_whole_then_delta_then_from_the_memo(tiny):
    handoff, port = _sender(tiny), LocalReceiver(ReceiverEngine(tiny))
    first = _share(handoff, port, CONTEXT, "kivi-4", session="s")
    assert not first.delta and not first.card_reused and first.wire_bytes > 0
    second = _share(handoff, port, TURN, "", session="s")  # the session keeps its context and codec
    assert second.delta and second.codec == "kivi-4" and second.reused_tokens > 0
    assert second.parent_card_id == first.card_id and port.pushed[-1].parent_tokens == second.reused_tokens
    again = _share(handoff, port, CONTEXT, "kivi-4")
    assert again.card_reused and again.card_id == first.card_id and len(port.pushed) == 2  # not sent again
    assert port.answer(second.card_id)


@pytest.fixture
def sink_tool() -> Iterator[tools.Tool]:
    """A toy tool: +sinkN keeps every tensor's first N tokens exact in fp16 (attention sinks)."""

    def apply(c: TensorCodec, n: int) -> TensorCodec:
        return c if c.is_float else dataclasses.replace(c, sink_tokens=n)

    tool = tools.Tool("+sink", "sink_tokens", "sink_tokens", apply, version=2, numbered=True,
                      description="NAME with every tensor's first N tokens kept in fp16")
    tools.register_tool(tool)
    yield tool
    tools.TOOLS.remove(tool)


def test_a_codec_tool_registered_here_travels_and_decodes(tiny, sink_tool):
    handoff, port = _sender(tiny), LocalReceiver(ReceiverEngine(tiny))
    stats = _share(handoff, port, CONTEXT, "kivi-2+sink4")
    layer = port.pushed[-1].layers[0]
    assert layer.key.sink_tokens == layer.value.sink_tokens == 4 and layer.key.bits == 2
    sent = handoff.engine.prefill(handoff.engine.context_ids(CONTEXT))[0]
    got = port.engine.card(stats.card_id).kv
    for mine, theirs in ((sent.keys[0], got.keys[0]), (sent.values[0], got.values[0])):
        assert torch.equal(theirs[:, :4], mine[:, :4].half().to(theirs.dtype))  # the sink travels exactly
        assert not torch.equal(theirs[:, 4:], mine[:, 4:].half().to(theirs.dtype))  # the rest is 2-bit
    assert "NAME+sinkN" in tools_info() and handoff.engine.codec("kivi-2+sink4").layers[0].value.sink_tokens == 4


def tools_info() -> dict[str, str]:
    return {f"NAME{t.pattern}": t.description for t in tools.TOOLS}


class DictTier(Tier):
    """A toy tier: records in a dict shared by every store that makes one."""

    name = "dict"
    keeps_spills = True

    def __init__(self, shelf: dict[Key, CardRecord]):
        self.shelf = shelf

    def put(self, key: Key, record: CardRecord) -> bool:
        self.shelf[key] = record
        return True

    def get(self, key: Key) -> Iterator[pb.CardFrame] | None:
        record = self.shelf.get(key)
        return None if record is None else frames(record.header, record.blobs)

    def remove(self, key: Key) -> None:
        self.shelf.pop(key, None)

    def __contains__(self, key: Key) -> bool:
        return key in self.shelf

    def held(self) -> tuple[int, int]:
        return sum(r.nbytes for r in self.shelf.values()), len(self.shelf)


@pytest.fixture
def shelf() -> Iterator[dict[Key, CardRecord]]:
    held: dict[Key, CardRecord] = {}
    tiered.register_tier("dict", lambda setting: DictTier(held))
    yield held
    del tiered.TIER_FACTORIES["dict"]


def test_a_store_tier_registered_here_serves_a_receiver_that_never_saw_the_card(tiny, shelf):
    handoff, first = _sender(tiny), LocalReceiver(ReceiverEngine(tiny))
    stats = _share(handoff, first, CONTEXT, "int8")
    assert [t.name for t in first.engine.store.tiers] == ["dict"] and len(shelf) == 1
    other = LocalReceiver(ReceiverEngine(tiny))  # empty RAM tiers, the same shelf
    assert asyncio.run(other.has_card(stats.card_id))
    assert other.engine.store.stats.get("dict", "reload") == 1
    assert torch.equal(other.engine.card(stats.card_id).kv.keys[1], first.engine.card(stats.card_id).kv.keys[1])
    assert other.answer(stats.card_id) == first.answer(stats.card_id)


class Echo(AnswerEngine):
    """A toy answer engine: answers with the codec and the tokens of the cache it was handed."""

    def text(self, ids: list[int]) -> tuple[KVCache | None, float]:
        return None, 0.0

    def answer(self, header: pb.CardHeader, kv: Callable[[], KVCache], ids: list[int], max_new_tokens: int,
               stats: Generation, tenant: str) -> Iterator[str]:
        yield f"{header.codec}:{kv().tokens}"


@pytest.fixture
def echo() -> Iterator[str]:
    register_answer_engine("echo", Echo)
    yield "echo"
    del answering.ANSWER_ENGINES["echo"]


def test_an_answer_engine_registered_here_answers_by_its_name(tiny, echo):
    cfg = ServiceConfig.from_env({}, engine=echo)
    engine = ReceiverEngine.from_config(cfg, tiny)
    assert isinstance(engine.answers, Echo)
    handoff, port = _sender(tiny), LocalReceiver(engine)
    card = _share(handoff, port, CONTEXT, "kivi-4")
    assert port.answer(card.card_id) == f"kivi-4:{card.context_tokens}"
    text = _share(handoff, port, CONTEXT, "text")
    assert port.answer(text.card_id) == "text:0"  # this engine keeps no cache for a text handoff
