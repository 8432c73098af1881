"""Pre-RoPE keys (codec option `+prerope`): keys coded with RoPE removed at their positions and
given it back after decoding; the math by hand, the layout, cards whose answers match the plain
ones (whole, delta and re-encoded cards elsewhere), the error it saves on a real model, and what is
refused."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from qkv_core.card.framing import frames
from qkv_core.card.header import CardPlan, build_card
from qkv_core.card.naming import name_card
from qkv_core.card.reencode import reencode
from qkv_core.codec import registry, rope
from qkv_core.codec.encoding import encode_layers, rope_removed
from qkv_core.codec.quant import dequantize, quantize
from qkv_core.codec.tensor_codec import Granularity, TensorCodec
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.sender import SenderEngine
from qkv_core.errors import CardError, ErrorKind, RequestError
from qkv_core.model.kv import next_logits, prefill
from qkv_core.model.prompt import encode
from tests.conftest import qa_rows, replaced

CONTEXT = "Depot 4 in sector 9 holds 417 crates of tin and opens at nine; depot 7 holds 88 crates. " * 2
PLAIN = '{"rope_theta": 10000.0, "rope_type": "default"}'


def test_the_rotation_by_hand():
    # head_dim 2: one frequency, base^0 = 1 rad per position. [1, 0] at position 1 -> [cos 1, sin 1],
    # [0, 1] at position 2 -> [-sin 2, cos 2]
    freq = rope._inv_freq(PLAIN, 2)
    assert freq.tolist() == [1.0]
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert torch.allclose(rope.apply(x, freq, 1),
                          torch.tensor([[[math.cos(1), math.sin(1)], [-math.sin(2), math.cos(2)]]]))
    assert torch.allclose(rope.apply(rope.apply(x, freq, 7), freq, 7, -1.0), x, atol=1e-6)
    assert rope._inv_freq(PLAIN, 8).tolist() == [1.0, 10000.0 ** -0.25, 10000.0 ** -0.5, 10000.0 ** -0.75]


def test_only_plain_rope_is_taken(tiny):
    gemma = ('{"full_attention": {"rope_theta": 1000000.0, "rope_type": "default"}, '
             '"sliding_attention": {"rope_theta": 10000.0}}')
    for bad in (gemma, '{"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0}', '{"rope_theta": null}',
                "not json"):
        with pytest.raises(RequestError, match="plain RoPE"):
            rope.inv_freq(dataclasses.replace(tiny.fingerprint, rope=bad))
    with pytest.raises(RequestError, match="keys only"):
        registry.resolve("k=4/channel;v=4/token+prerope", 1)
    with pytest.raises(RequestError, match="takes \\+zstd only"):
        registry.adaptive("tokenmix-3+prerope")
    layer = registry.resolve("kivi-2+rot+prerope", 1)[0]
    assert layer.key.pre_rope and layer.key.rotation and not layer.value.pre_rope and layer.value.rotation
    assert registry.spec_of(layer.key) == "2/channel+rot+prerope"


def test_a_pre_rope_blob_is_the_plain_layout_of_the_keys_without_rope(tiny):
    ids = encode(tiny.tokenizer, CONTEXT)
    kv, _ = prefill(tiny, ids)
    layers = registry.resolve("kivi-3+prerope", tiny.num_layers)
    (k_blob, v_blob), *_ = encode_layers(kv, layers, [0], fp=tiny.fingerprint)
    unroped = rope.apply(kv.keys[0], rope.inv_freq(tiny.fingerprint), 0, -1.0)
    plain = TensorCodec(3, Granularity.PER_CHANNEL)
    assert k_blob == quantize(unroped, plain).numpy().tobytes()
    # values as they are
    assert v_blob == quantize(kv.values[0], TensorCodec(3, Granularity.PER_TOKEN)).numpy().tobytes()
    # a cache that begins later in the context (a delta) has its keys unrotated at their own positions
    tail = rope_removed(kv.keys[0][:, 5:], layers[0].key, tiny.fingerprint, len(ids))
    assert torch.allclose(tail, unroped[:, 5:], atol=1e-5)


def _accepted(lm, ids, kv, name):
    plan = CardPlan(name, registry.resolve(name, lm.num_layers))
    header, blobs = build_card(lm.fingerprint, ids, kv, plan)
    return header, blobs, ReceiverEngine(lm).accept(frames(header, blobs)).kv


def test_a_pre_rope_card_gives_the_receiver_its_keys_back(tiny):
    ids = encode(tiny.tokenizer, CONTEXT)
    kv, _ = prefill(tiny, ids)
    _, _, plain = _accepted(tiny, ids, kv, "fp32")
    header, blobs, roped = _accepted(tiny, ids, kv, "fp32+prerope")
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain.keys, roped.keys))
    probe = encode(tiny.tokenizer, " Which depot holds tin?")
    assert float((next_logits(tiny, roped, probe) - next_logits(tiny, plain, probe)).abs().max()) < 1e-4
    # re-encoded by a squeezed store, a pre-RoPE card stays one: its keys are still the model's
    header2, blobs2 = reencode(header, blobs)
    squeezed = ReceiverEngine(tiny).accept(frames(header2, blobs2)).kv
    assert header2.layers[0].key.pre_rope
    assert all(float((a - b).abs().max()) < 0.05 * float(b.abs().max()) for a, b in zip(squeezed.keys, kv.keys))


def test_a_card_claiming_pre_rope_values_or_a_model_without_plain_rope_is_invalid(tiny):
    ids = encode(tiny.tokenizer, CONTEXT)
    kv, _ = prefill(tiny, ids)
    header, blobs = build_card(tiny.fingerprint, ids, kv,
                               CardPlan("fp16+prerope", registry.resolve("fp16+prerope", tiny.num_layers)))
    values = replaced(header)
    values.layers[0].value.pre_rope = True
    scaled = replaced(header)  # a model whose RoPE a reader cannot apply from the fingerprint alone
    scaled.model.rope = '{"factor": 8.0, "rope_theta": 500000.0, "rope_type": "llama3"}'
    receiver_of_scaled = dataclasses.replace(tiny,
                                             fingerprint=dataclasses.replace(tiny.fingerprint, rope=scaled.model.rope))
    for bad, lm, match in [(values, tiny, "values carry no RoPE"), (scaled, receiver_of_scaled, "plain RoPE")]:
        name_card(bad, blobs)  # a sender that means what it sends: only the reader's checks stand in between
        with pytest.raises(CardError, match=match) as err:
            ReceiverEngine(lm).accept(frames(bad, blobs))
        assert err.value.kind == ErrorKind.INVALID


@pytest.mark.integration
def test_pre_rope_keys_lose_less_on_a_real_model(embedded):
    """SmolLM2 on a SQuAD context: 2-bit per-channel keys with RoPE removed reconstruct better
    (after RoPE is applied again) than the same codes on the keys as cached."""
    sender = SenderEngine(embedded)
    ids = encode(embedded.tokenizer, sender.prompt.context_part(qa_rows("squad.jsonl", 1)[0]["context"]))
    kv, _ = sender.prefill(ids)
    freq = rope.inv_freq(embedded.fingerprint)
    c = TensorCodec(2, Granularity.PER_CHANNEL)
    err = {"plain": 0.0, "pre_rope": 0.0}
    norm = sum(float(k.float().pow(2).sum()) for k in kv.keys)
    for k in kv.keys:
        err["plain"] += float((dequantize(quantize(k, c), c, k.shape, torch.float32) - k.float()).pow(2).sum())
        u = rope.apply(k, freq, 0, -1.0)
        back = rope.apply(dequantize(quantize(u, c), c, k.shape, torch.float32), freq, 0)
        err["pre_rope"] += float((back - k.float()).pow(2).sum())
    assert (err["pre_rope"] / norm) ** 0.5 < 0.9 * (err["plain"] / norm) ** 0.5
