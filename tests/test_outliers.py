"""Outliers kept exact (+outN, dense-and-sparse): the layout byte for byte, round trips, the card
field and what the reader refuses, and the error on a real model."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv_core.codec import registry
from qkv_core.codec.encoding import reconstructed
from qkv_core.codec.quant import dequantize, encoded_size, outlier_count, quantize
from qkv_core.codec.tensor_codec import Entropy, Granularity, TensorCodec
from qkv_core.engine.sender import SenderEngine
from qkv_core.errors import RequestError
from qkv_core.model.prompt import encode
from tests.conftest import expect_invalid, qa_rows, replaced, tool_card


def test_the_layout_byte_for_byte():
    """One 2-bit per-token row [0, 0.2, 0.6, 9] with 2,500 per 10,000 (one value) kept: 9 is the
    farthest from the mean, so the range is [0, 0.6]: zero 0, scale 0.2 rounded up to fp16
    (0x3267 = 0.20007), codes [0, 1, 3, 3] (9 clamped) packed into 0b11_11_01_00; then the index
    3 as int32 and 9 as fp16 (0x4880)."""
    x = torch.tensor([0.0, 0.2, 0.6, 9.0]).view(1, 1, 4)
    codec = TensorCodec(2, Granularity.PER_TOKEN, outliers=2500)
    blob = quantize(x, codec)
    assert blob.tolist() == [0b11110100, 0x67, 0x32, 0x00, 0x00, 3, 0, 0, 0, 0x80, 0x48]
    assert blob.numel() == encoded_size(codec, 1, 1, 4)
    assert dequantize(blob, codec, (1, 1, 4),
                      torch.float32).flatten().tolist() == pytest.approx([0.0, 0.20007, 0.60022, 9.0], abs=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(1, 8),
    granularity=st.sampled_from([Granularity.PER_TOKEN, Granularity.PER_CHANNEL, Granularity.PER_TENSOR]),
    tokens=st.integers(1, 40),
    per_10k=st.sampled_from([1, 50, 400, 10_000]),
    seed=st.integers(0, 2**16),
)
def test_the_kept_values_come_back_exactly_and_the_rest_within_half_a_step(bits, granularity, tokens, per_10k, seed):
    """The k kept values decode to themselves in fp16; every other value to within half a step of
    its row's range without them; entropy coding changes nothing."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, 8, generator=g)
    x.view(-1)[torch.randint(0, x.numel(), (3,), generator=g)] *= 50  # a few spikes
    codec = TensorCodec(bits, granularity, outliers=per_10k)
    blob = quantize(x, codec)
    y = dequantize(blob, codec, x.shape, torch.float32)
    coded = TensorCodec(bits, granularity, outliers=per_10k, entropy=Entropy.ZSTD)
    assert torch.equal(dequantize(quantize(x, coded), coded, x.shape, torch.float32), y)
    k = outlier_count(codec, x.numel())
    index = blob[blob.numel() - 6 * k : blob.numel() - 2 * k].clone().view(torch.int32).long()
    assert torch.equal(y.view(-1)[index], x.view(-1)[index].half().float())
    kept = torch.zeros(x.numel(), dtype=torch.bool)
    kept[index] = True
    kept = kept.view(x.shape)
    dim = {Granularity.PER_TOKEN: (2,), Granularity.PER_CHANNEL: (1,), Granularity.PER_TENSOR: (0, 1, 2)}[granularity]
    low = torch.where(kept, torch.inf, x).amin(dim, keepdim=True)
    high = torch.where(kept, -torch.inf, x).amax(dim, keepdim=True)
    step = torch.where(torch.isfinite(low), high - low, 0.0) / ((1 << bits) - 1)
    rest = ~kept
    assert ((y - x).abs()[rest] <= (step * 0.51 + 1e-3 * x.abs() + 1e-6).expand_as(x)[rest]).all()


def test_spikes_no_longer_stretch_their_rows():
    x = torch.randn(3, 200, 64, generator=torch.Generator().manual_seed(0))
    x[:, ::37, 5] += 30.0  # a few tokens with one huge channel: their rows' ranges blow up
    err = {}
    for name in ("kivi-2", "kivi-2+out10", "kivi-2+out100"):
        layer = registry.resolve(name, 1)[0]
        err[name] = [float((dequantize(quantize(x, c), c, x.shape,
                                       torch.float32) - x).norm() / x.norm()) for c in (layer.key, layer.value)]
    assert all(a > b > c for a, b, c in zip(*err.values())), err


def test_the_tool_and_its_refusals():
    layer = registry.resolve("kivi-2+rot+out10", 1)[0]
    assert (layer.key.outliers, layer.value.outliers) == (10, 10) and layer.key.rotation
    assert registry.spec_of(layer.key) == "2/channel+rot+out10"
    assert registry.resolve("fp16+out10", 1)[0].key == TensorCodec(16)  # nothing to keep exact
    assert registry.resolve("k=2/channel+out5;v=2/token", 1)[0].key.outliers == 5
    kind = registry.adaptive("budget-2+out10+rot+zstd")
    # with or without, per tensor
    assert kind.profile_tools == "+rot+out10" and kind.profile_sets == ("+rot", "+rot+out10")
    assert registry.adaptive("budget-2+lloyd+out10").profile_sets == ("", "+lloyd", "+out10", "+lloyd+out10")
    for bad in ("kivi-2+out0", "kivi-2+out10001"):
        with pytest.raises(RequestError, match="outliers are 1..10000"):
            registry.resolve(bad, 1)
    with pytest.raises(RequestError, match="takes \\+zstd only"):
        registry.adaptive("tokenmix-3+out10")


def test_a_card_carries_its_outliers_and_bad_ones_are_invalid(tiny):
    card = tool_card(tiny, "kivi-2+out100")
    header, blobs, kv, codec = card.header, card.blobs, card.kv, card.codec
    assert header.format_version == 4 and header.layers[0].key.outliers == 100
    assert torch.equal(card.got.values[0], card.expected("value", 0))
    more = replaced(header)  # declares more outliers than the blob holds: a size mismatch
    more.layers[0].key.outliers = 200
    expect_invalid(tiny, more, blobs, "sizes do not match")
    spec = header.layers[0]  # indices out of order: swap the first two outliers' indices of K
    k = outlier_count(codec.key, kv.keys[0].numel())
    start = encoded_size(codec.key, *kv.keys[0].shape) - 6 * k
    data = bytearray(blobs[0])
    data[start : start + 8] = data[start + 4 : start + 8] + data[start : start + 4]
    expect_invalid(tiny, replaced(header), [bytes(data), *blobs[1:]], "outlier indices")
    assert spec.key_bytes == len(blobs[0]) - spec.value_bytes


@pytest.mark.integration
def test_outliers_cut_the_error_on_a_real_model(embedded):
    """SmolLM2 on a SQuAD context at 2 bits: 0.1% of values kept exact cuts K and V error; after
    rotation, which spreads outliers over a head already, it cuts less."""
    sender = SenderEngine(embedded)
    ids = encode(embedded.tokenizer, sender.prompt.context_part(qa_rows("squad.jsonl", 1)[0]["context"]))
    kv, _ = sender.prefill(ids)
    cut = {}
    for base in ("kivi-2", "kivi-2+rot"):
        for kind, tensors in (("key", kv.keys), ("value", kv.values)):
            err = []
            for name in (base, f"{base}+out10"):
                codec = getattr(registry.resolve(name, 1)[0], kind)
                got = reconstructed(tensors, [codec] * len(tensors), embedded.fingerprint, len(ids))
                err.append(sum(float((a - b).pow(2).sum()) for a,
                               b in zip(got, tensors)) / sum(float(t.pow(2).sum()) for t in tensors))
            cut[base, kind] = err[1] / err[0]
    assert all(ratio < 1 for ratio in cut.values()), cut
    assert cut["kivi-2+rot", "key"] > cut["kivi-2", "key"], cut
