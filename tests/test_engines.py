"""What answers a receiver's Generate (`engine`: hf here, vllm in integrations/vllm, whose own tests
need the vLLM environment): the context token ids every card now carries (what a vLLM receiver puts
in its prompt) and the reader's check of them, the engine setting, and what Info says of each."""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest
from conftest import resigned

from qkv_core.card.framing import frames
from qkv_core.card.naming import context_digest
from qkv_core.config import ServiceConfig
from qkv_core.engine.answering import Generation, HFAnswers, answer_engine
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.sender import Parent, SenderEngine
from qkv_core.errors import CardError, ErrorKind, Unsupported
from receiver_service.server import load_for
from service_common.info import build_info
from service_common.server import preflight

CONTEXT = "The depot in Lyon holds 417 crates of tin and opens at nine; the one in Porto holds 88. " * 3


def test_every_card_carries_its_context_token_ids(tiny):
    sender, receiver = SenderEngine(tiny, cache_bytes=1 << 24), ReceiverEngine(tiny)
    ids = sender.context_ids(CONTEXT)
    card = sender.prepare(CONTEXT, "kivi-4")
    assert list(card.header.context_ids) == ids and card.header.context_ids_sha256 == context_digest(ids)
    kept = receiver.accept(frames(card.header, card.blobs))
    assert list(kept.header.context_ids) == ids
    # a delta card carries the whole context's ids, its parent's too
    longer = CONTEXT + "Porto opens at ten."
    delta = sender.prepare(longer, "kivi-4", parent=Parent(card.header.card_id, 32))
    assert delta.header.parent_card_id and list(delta.header.context_ids) == sender.context_ids(longer)
    # and a text handoff is kept under its ids
    text, _ = receiver.accept_text(CONTEXT)
    assert list(text.header.context_ids) == ids and text.header.context_ids_sha256 == context_digest(ids)


@pytest.mark.parametrize("change", ["one id", "one id short"])
def test_context_ids_that_are_not_the_cards_tokens_are_invalid(tiny, change):
    sender, receiver = SenderEngine(tiny, cache_bytes=1 << 24), ReceiverEngine(tiny)
    card = sender.prepare(CONTEXT, "int8")
    ids = list(card.header.context_ids)
    ids = [ids[0] + 1, *ids[1:]] if change == "one id" else ids[:-1]
    with pytest.raises(CardError) as e:
        receiver.accept(frames(resigned(card, context_ids=ids), card.blobs))
    assert e.value.kind == ErrorKind.INVALID and "context token ids" in str(e.value)
    assert len(receiver.store) == 0


def test_the_hf_engine_counts_the_cards_tokens_as_not_computed(tiny):
    sender, receiver = SenderEngine(tiny, cache_bytes=1 << 24), ReceiverEngine(tiny)
    sent = sender.prepare(CONTEXT, "fp16")
    card = receiver.accept(frames(sent.header, sent.blobs))
    stats = Generation(card.header.card_id)
    for _ in receiver.generate(card.header.card_id, "Which depot holds tin?", 4, False, stats):
        pass
    assert stats.tokens > 0 and stats.cached_tokens == card.header.context_tokens > 0


def test_the_engine_setting_names_a_registered_answer_engine():
    assert ServiceConfig.from_env({"QKVCOMM_ENGINE": "vllm"}).engine == "vllm"
    assert ServiceConfig.from_env({}).engine == "hf"
    assert answer_engine("hf") is HFAnswers
    with pytest.raises(ValueError, match="choose hf or vllm"):
        preflight("receiver", ServiceConfig.from_env({}, engine="tgi", port=0, metrics_port=-1))


@pytest.mark.skipif(importlib.util.find_spec("qkvcomm_vllm") is not None, reason="qkvcomm-vllm is installed here")
def test_the_vllm_engine_without_vllm_says_what_to_install():
    with pytest.raises(Unsupported, match="needs vLLM and the qkvcomm-vllm package"):
        load_for(ServiceConfig.from_env({}, engine="vllm"))


def test_info_says_which_engine_answers_and_what_it_takes(tiny):
    hf = build_info("receiver", tiny, ServiceConfig.from_env({})).features
    assert hf.engine == "hf" and hf.sessions and hf.layer_selection
    vllm = build_info("receiver", tiny, dataclasses.replace(ServiceConfig.from_env({}), engine="vllm"),
                      whole_cards_only=True).features
    assert vllm.engine == "vllm" and not vllm.sessions and not vllm.layer_selection  # whole cards only
    assert build_info("sender", tiny, ServiceConfig.from_env({}, role="sender")).features.engine == ""
