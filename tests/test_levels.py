"""Non-uniform levels (+lloyd): the Lloyd-Max fit, the layout byte for byte, round trips, the
card field and what the reader refuses, and the error on a real model."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv_core.codec import registry
from qkv_core.codec.encoding import reconstructed
from qkv_core.codec.levels import LLOYD, fit, lloyd_max, unit_values
from qkv_core.codec.quant import dequantize, quantize
from qkv_core.codec.tensor_codec import Entropy, Granularity, TensorCodec
from qkv_core.engine.sender import SenderEngine
from qkv_core.errors import RequestError
from qkv_core.model.prompt import encode
from tests.conftest import expect_invalid, qa_rows, replaced, tool_card


def test_lloyd_max_finds_the_gaussian_levels():
    """The 4-level Lloyd-Max quantizer of N(0, 1) is +-0.4528 and +-1.510 (Max, 1960)."""
    sample = torch.randn(400_000, generator=torch.Generator().manual_seed(0))
    levels = lloyd_max(sample, 4)
    assert torch.allclose(levels, torch.tensor([-1.510, -0.4528, 0.4528, 1.510]), atol=0.02)


def test_a_fit_with_exact_ends_keeps_each_rows_min_and_max():
    """Per-token rows of Gaussian values: free levels pull the ends inwards; with exact ends the
    first and last stay at 0 and 1 and the two inner levels move towards the middle, where the
    values are. Every fit is ascending and on the 1/4096 grid."""
    x = torch.randn(4, 300, 64, generator=torch.Generator().manual_seed(0))
    sample = unit_values(x, per_channel=False)
    assert sample.min() == 0 and sample.max() == 1 and sample.numel() == x.numel()
    free, exact = fit(sample, 2), fit(sample, 2, exact_ends=True)
    assert 0.1 < free[0] and free[-1] < 0.9
    assert exact[0] == 0.0 and exact[-1] == 1.0 and 1 / 3 < exact[1] < exact[2] < 2 / 3
    for levels in (free, exact, fit(sample, 4, exact_ends=True)):
        assert all(a < b for a, b in zip(levels, levels[1:])) and all(v * 4096 == round(v * 4096) for v in levels)
    assert fit(torch.full((1000,), 0.5), 2) == (0.0, 1 / 3, 2 / 3, 1.0)  # levels that collapse: uniform


def test_the_table_is_ascending_and_exact_in_fp32():
    for bits, levels in LLOYD.items():
        assert len(levels) == 1 << bits and all(0 < a < b < 1 for a, b in zip(levels, levels[1:]))
        assert all(float(torch.tensor(x, dtype=torch.float32)) == x for x in levels)  # as the card carries them


def test_the_layout_byte_for_byte():
    """One 2-bit per-token row [0, 0.25, 0.6, 1]: zero 0, scale 1/3 rounded up to fp16 (0x3556).
    In code units the values are [0, 0.75, 1.80, 3.00] and the levels 3 * LLOYD[2] = [0.553, 1.214,
    1.783, 2.446], midpoints [0.884, 1.499, 2.115]: codes [0, 0, 2, 3] (uniform: [0, 1, 2, 3]),
    packed LSB first into 0b11_10_00_00."""
    x = torch.tensor([0.0, 0.25, 0.6, 1.0]).view(1, 1, 4)
    codec = TensorCodec(2, Granularity.PER_TOKEN, levels=LLOYD[2])
    assert quantize(x, codec).tolist() == [0b11100000, 0x56, 0x35, 0x00, 0x00]
    assert quantize(x, TensorCodec(2, Granularity.PER_TOKEN)).tolist()[0] == 0b11100100
    scale = float(torch.tensor(1 / 3).to(torch.float16).nextafter(torch.tensor(1.0, dtype=torch.float16)))
    assert scale == pytest.approx(0.33349609375)
    expected = [scale * 3 * LLOYD[2][c] for c in (0, 0, 2, 3)]
    got = dequantize(quantize(x, codec), codec, (1, 1, 4), torch.float32).flatten().tolist()
    assert got == pytest.approx(expected, abs=1e-7)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(sorted(LLOYD)),
    granularity=st.sampled_from([Granularity.PER_TOKEN, Granularity.PER_CHANNEL]),
    tokens=st.integers(1, 40),
    rotation=st.sampled_from([0, 7]),
    seed=st.integers(0, 2**16),
)
def test_every_value_decodes_to_its_nearest_level(bits, granularity, tokens, rotation, seed):
    """Within a row, |x - x_hat| is at most the larger of the half gaps and the end margins of
    the levels, times the row's range (for a row of one value, what rounding its zero point to
    fp16 costs); entropy coding changes no code."""
    x = torch.randn(2, tokens, 8, generator=torch.Generator().manual_seed(seed))
    codec = TensorCodec(bits, granularity, rotation=rotation, levels=LLOYD[bits])
    y = dequantize(quantize(x, codec), codec, x.shape, torch.float32)
    coded = TensorCodec(bits, granularity, rotation=rotation, levels=LLOYD[bits], entropy=Entropy.ZSTD)
    assert torch.equal(dequantize(quantize(x, coded), coded, x.shape, torch.float32), y)
    if rotation:
        return  # the bound below holds in the rotated space
    levels = LLOYD[bits]
    worst = max(levels[0], 1 - levels[-1], *((b - a) / 2 for a, b in zip(levels, levels[1:])))
    dim = 2 if granularity == Granularity.PER_TOKEN else 1
    span = x.amax(dim, keepdim=True) - x.amin(dim, keepdim=True)
    assert ((y - x).abs() <= worst * span * 1.002 + 1e-3 * x.abs()).all()  # plus the zero point's fp16 rounding


def test_the_tool_and_its_refusals():
    layer = registry.resolve("kivi-2+rot+lloyd", 1)[0]
    assert layer.key.levels == LLOYD[2] == layer.value.levels and layer.key.rotation
    assert registry.spec_of(layer.key) == "2/channel+rot+lloyd"
    assert registry.resolve("kivi-8+lloyd", 1)[0].key.levels == ()  # wider widths stay uniform
    assert registry.adaptive("budget-2+rot+prerope+lloyd+zstd").profile_tools == "+rot+prerope+lloyd"
    for bad in [(0.5, 0.1, 0.6, 0.9), (0.1, 0.2, 0.3), (0.0, 0.3, 0.6, 1.5), (0.1, float("nan"), 0.6, 0.9)]:
        with pytest.raises(RequestError, match="non-uniform levels"):
            TensorCodec(2, Granularity.PER_TOKEN, levels=bad)
    with pytest.raises(RequestError, match="non-uniform levels"):
        TensorCodec(2, Granularity.PER_TOKEN, salient_bits=8, levels=LLOYD[2])


def test_a_card_carries_its_levels_and_bad_ones_are_invalid(tiny):
    card = tool_card(tiny, "kivi-2+lloyd")
    header, blobs = card.header, card.blobs
    assert header.format_version == 4 and list(header.layers[0].key.levels) == list(LLOYD[2])
    assert torch.equal(card.got.keys[0], card.expected("key", 0))
    for levels in ([0.9, 0.1, 0.5, 0.6], [0.1, 0.9], [0.1, 0.2, 0.3, 2.0]):
        bad = replaced(header)
        bad.layers[0].key.levels[:] = levels
        expect_invalid(tiny, bad, blobs, "non-uniform levels")


@pytest.mark.integration
def test_lloyd_levels_lose_less_on_a_real_model(embedded):
    """SmolLM2 on a SQuAD context, rotated with K pre-RoPE: at 1 and 2 bits the Lloyd-Max levels
    reconstruct K and V better than uniform levels, at the same bytes."""
    sender = SenderEngine(embedded)
    ids = encode(embedded.tokenizer, sender.prompt.context_part(qa_rows("squad.jsonl", 1)[0]["context"]))
    kv, _ = sender.prefill(ids)
    for bits in (1, 2):
        for kind, tensors in (("key", kv.keys), ("value", kv.values)):
            err = {}
            for name in (f"kivi-{bits}+rot+prerope", f"kivi-{bits}+rot+prerope+lloyd"):
                codec = getattr(registry.resolve(name, 1)[0], kind)
                got = reconstructed(tensors, [codec] * len(tensors), embedded.fingerprint, len(ids))
                err[name] = sum(float((a - b).pow(2).sum()) for a,
                                b in zip(got, tensors)) / sum(float(t.pow(2).sum()) for t in tensors)
            plain, lloyd = err.values()
            assert lloyd < (0.8 if bits == 2 else 0.5) * plain, (bits, kind, err)
