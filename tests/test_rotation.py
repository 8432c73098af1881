"""The randomized Hadamard rotation over head_dim (codec option `+rot`): the signs and matrix as
specified, the inverse exact to fp32 precision, the blob layout, the codec grammar, and cards: a
rotated fp16 card answers like the unrotated one, and rotation helps where its theory says it does
(an outlier channel, per-token codes)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv_core.card.framing import frames
from qkv_core.codec import registry
from qkv_core.codec.quant import dequantize, quantize
from qkv_core.codec.rotation import hadamard, rotate, signs, unrotate
from qkv_core.codec.tensor_codec import Granularity, TensorCodec
from qkv_core.codec.tools import ROTATION_SEED
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.sender import SenderEngine
from qkv_core.errors import RequestError
from qkv_core.model.kv import next_logits
from qkv_core.model.prompt import encode

CONTEXT = "Depot 4 in sector 9 holds 417 crates of tin and opens at nine; depot 7 holds 88 crates. " * 2


def test_the_signs_and_the_matrix_are_the_specified_ones():
    # SHA-256("qkvcomm-rotation:1:0:0") begins 0xb9 0x27: bits LSB first 1,0,0,1,1,1,0,1 then 1,1,1,0,0,1,0,0
    assert signs(1, 1, 16)[0].tolist() == [-1, 1, 1, -1, -1, -1, 1, -1, -1, -1, -1, 1, 1, -1, 1, 1]
    assert not torch.equal(signs(1, 2, 16)[0], signs(1, 2, 16)[1])  # every head its own signs
    assert not torch.equal(signs(1, 1, 16), signs(2, 1, 16))
    assert (hadamard(4) * 2).tolist() == [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]
    assert torch.allclose(hadamard(64) @ hadamard(64).T, torch.eye(64), atol=1e-6)
    with pytest.raises(RequestError, match="power-of-two head dim"):
        hadamard(96)


@settings(max_examples=60, deadline=None)
@given(heads=st.integers(1, 4), tokens=st.integers(0, 9), log_dim=st.integers(0, 7), seed=st.integers(1, 2**32 - 1),
       scale=st.floats(1e-3, 1e3), data=st.integers(0, 2**16))
def test_the_inverse_is_exact_to_fp32_precision(heads, tokens, log_dim, seed, scale, data):
    x = torch.randn(heads, tokens, 2**log_dim, generator=torch.Generator().manual_seed(data)) * scale
    y = rotate(x, seed)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-6 * scale)  # orthogonal
    assert torch.allclose(unrotate(y, seed), x, rtol=1e-5, atol=1e-5 * scale)


def test_a_rotated_blob_is_the_plain_layout_of_the_rotated_tensor():
    x = torch.tensor([[[0.0, 3.0], [1.0, 1.0]]])
    codec = TensorCodec(2, Granularity.PER_TOKEN, rotation=1)
    blob = quantize(x, codec)
    # the same bytes as quantizing the rotated tensor without rotation: the layout does not change
    assert torch.equal(blob, quantize(rotate(x, 1), TensorCodec(2, Granularity.PER_TOKEN)))
    # golden: signs(1, 1, 2) = [-1, +1], so rows [0, 3] -> [3, -3]/sqrt2 and [1, 1] -> [0, -2]/sqrt2:
    # codes [3, 0] and [3, 0]; fp16 scales 1.415 (0x3DA9) and 0.4717 (0x378C), rounded up; fp16
    # zeros -2.123 (0xC03F) and -1.415 (0xBDA9), rounded down
    assert blob.tolist() == [0b0011 | 0b0011 << 4, 0xA9, 0x3D, 0x8C, 0x37, 0x3F, 0xC0, 0xA9, 0xBD]
    assert torch.allclose(dequantize(blob, codec, x.shape, torch.float32), x, atol=2e-3)


def test_rotation_tames_an_outlier_channel_for_per_token_codes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 64, generator=g)
    x[:, :, 5] *= 40  # one outlier channel, as real keys have
    errors = {}
    for rotation in (0, 1):
        codec = TensorCodec(3, Granularity.PER_TOKEN, rotation=rotation)
        y = dequantize(quantize(x, codec), codec, x.shape, torch.float32)
        errors[rotation] = ((y - x).norm() / x.norm()).item()
    assert errors[1] < errors[0] / 2, errors


def test_the_codec_grammar():
    layers = registry.resolve("kivi-2+rot", 3)
    assert all(c.key.rotation == c.value.rotation == ROTATION_SEED for c in layers)
    assert layers[0].key.granularity == Granularity.PER_CHANNEL and layers[0].key.bits == 2
    spec = registry.resolve("k=3/group/16+rot;v=4/token", 1)[0]
    assert spec.key.rotation and not spec.value.rotation
    v_only = registry.resolve("k=2/channel;v=2/token+rot", 1)[0]  # the suffix is the last tensor's, not the name's
    assert not v_only.key.rotation and v_only.value.rotation
    assert registry.spec_of(spec.key) == "3/group/16+rot"
    assert registry.spec_of(registry.resolve("fp16+rot", 1)[0].key) == "fp16+rot"
    with pytest.raises(RequestError, match="takes \\+zstd only"):
        registry.adaptive("seed-adaptive+rot")  # its profile ranks unrotated per-tensor errors
    assert registry.adaptive("budget-3+rot").profile_tools == "+rot"  # budget-B reads a rotated profile


def test_a_rotated_fp16_card_answers_like_the_plain_one(tiny):
    sender = SenderEngine(tiny, cache_bytes=1 << 24)
    query = encode(tiny.tokenizer, "Which depot holds tin?")
    logits = {}
    for codec in ("fp16", "fp16+rot"):
        card = sender.prepare(CONTEXT, codec)
        assert all(spec.key.rotation_seed == (codec == "fp16+rot") for spec in card.header.layers)
        kept = ReceiverEngine(tiny).accept(frames(card.header, card.blobs))
        logits[codec] = next_logits(tiny, kept.kv, query)
    scale = logits["fp16"].abs().max()
    assert (logits["fp16+rot"] - logits["fp16"]).abs().max() <= 2e-3 * scale
    assert logits["fp16+rot"].argmax() == logits["fp16"].argmax()
