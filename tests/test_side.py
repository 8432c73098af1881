"""Compact side information (+s8): scales and zero points one byte each on grids of the tensor's
own. The layout byte for byte, round trips read against an independent parse of the bytes, the
card field and what the reader refuses, and the size and error on a real model."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv_core.codec import registry
from qkv_core.codec.encoding import reconstructed
from qkv_core.codec.packing import packed_size
from qkv_core.codec.quant import dequantize, encoded_size, quantize
from qkv_core.codec.tensor_codec import Entropy, Granularity, TensorCodec
from qkv_core.engine.sender import SenderEngine
from qkv_core.errors import RequestError
from qkv_core.model.prompt import encode
from tests.conftest import expect_invalid, qa_rows, replaced, tool_card


def test_the_layout_byte_for_byte():
    """Two 2-bit per-token rows, [0, 1, 2, 3] and [255/128 + 0.5 c for c in 0..3]. Zero grid: base
    0, step 255/128 / 255 = 1/128 (fp16 0x2000), codes 0 and 255. Scales needed 1 and 0.5: top 1
    (0x3C00), span log2(1 / 0.5) = 1 octave (0x3C00), codes 255 and 0. Both rows code to [0, 1, 2,
    3], packed low bits first into 0b11_10_01_00."""
    low = 255 / 128
    x = torch.tensor([[0.0, 1, 2, 3], [low, low + 0.5, low + 1, low + 1.5]]).view(1, 2, 4)
    codec = TensorCodec(2, Granularity.PER_TOKEN, side_bits=8)
    blob = quantize(x, codec)
    assert blob.tolist() == [0xE4, 0xE4, 0x00, 0x00, 0x00, 0x20, 0x00, 0x3C, 0x00, 0x3C, 255, 0, 0, 255]
    assert blob.numel() == encoded_size(codec, 1, 2, 4) == 2 + 8 + 2 * 2
    assert torch.equal(dequantize(blob, codec, (1, 2, 4), torch.float32), x)


def _side(blob: torch.Tensor, codes_bytes: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zero points) of a compact part, read from its bytes as the layout says."""
    base, step, top, span = blob[codes_bytes : codes_bytes + 8].clone().view(torch.float16).float().tolist()
    sq = blob[codes_bytes + 8 : codes_bytes + 8 + rows].float()
    zq = blob[codes_bytes + 8 + rows : codes_bytes + 8 + 2 * rows].float()
    return top * torch.exp2((sq - 255) * span / 255), base + step * zq


ROW_DIMS = {Granularity.PER_TOKEN: (2,), Granularity.PER_CHANNEL: (1,), Granularity.PER_TENSOR: (0, 1, 2)}


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8),
    granularity=st.sampled_from(list(ROW_DIMS)),
    tokens=st.integers(1, 40),
    spread=st.floats(1e-3, 1e3),
    constant_rows=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_round_trips_stay_within_half_a_step_of_grids_one_code_wide(bits, granularity, tokens, spread,
                                                                    constant_rows, seed):
    """Every value decodes to within half its row's scale; each zero point lies at or below its row
    and within one grid step of it, each scale covers its row and is at most one grid ratio above
    the scale it needs; entropy coding changes nothing."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, tokens, 8, generator=g) * torch.rand(2, tokens, 1, generator=g).mul(spread)
         + torch.randn(2, 1, 8, generator=g))
    if constant_rows:
        x[:, ::3] = 0.25
    codec = TensorCodec(bits, granularity, side_bits=8)
    blob = quantize(x, codec)
    assert blob.numel() == encoded_size(codec, *x.shape)
    y = dequantize(blob, codec, x.shape, torch.float32)
    coded = TensorCodec(bits, granularity, side_bits=8, entropy=Entropy.ZSTD)
    assert torch.equal(dequantize(quantize(x, coded), coded, x.shape, torch.float32), y)

    dims = ROW_DIMS[granularity]
    low, high = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    rows = low.numel()
    scale, zero = (t.view(low.shape) for t in _side(blob, packed_size(x.numel(), bits), rows))
    qmax = (1 << bits) - 1
    tol = 1e-6 * (x.abs().amax() + 1)
    assert (zero <= low).all() and (zero + scale * qmax >= high - tol).all()
    assert ((y - x).abs() <= scale / 2 + tol).all()
    head = blob[packed_size(x.numel(), bits) :][:8].clone().view(torch.float16).float()
    assert (low - zero <= head[1] + tol).all()  # one zero step
    need = (high - zero) / qmax
    ratio = 2 ** (float(head[3]) / 255)
    assert (scale[need > tol] <= need[need > tol] * ratio * (1 + 1e-5)).all()  # one scale step


@pytest.mark.parametrize("tools", ["+lloyd", "+out50", "+rot"])
def test_it_composes_with_the_other_tools(tools):
    x = torch.randn(3, 30, 16, generator=torch.Generator().manual_seed(1))
    x[:, 7, 3] += 20
    for kind in ("key", "value"):
        plain = getattr(registry.resolve(f"kivi-2{tools}", 1)[0], kind)
        compact = getattr(registry.resolve(f"kivi-2{tools}+s8", 1)[0], kind)
        errors = [float((dequantize(quantize(x, c), c, x.shape, torch.float32) - x).norm() / x.norm())
                  for c in (plain, compact)]
        assert errors[1] == pytest.approx(errors[0], rel=0.15)
        assert encoded_size(compact, *x.shape) < encoded_size(plain, *x.shape)


def test_the_tool_and_its_refusals():
    layer = registry.resolve("kivi-2+rot+s8", 1)[0]
    assert (layer.key.side_bits, layer.value.side_bits) == (8, 8) and layer.key.rotation
    assert registry.spec_of(layer.key) == "2/channel+rot+s8"
    assert registry.resolve(registry.spec_of(layer.key).join(["k=", ";v=2/token"]), 1)[0].key == layer.key
    assert registry.resolve("fp16+s8", 1)[0].key == TensorCodec(16)  # nothing to make compact
    assert registry.adaptive("budget-2+s8+rot+zstd").profile_sets == ("+rot+s8",)  # on every tensor
    for bad in (dict(bits=16, side_bits=8), dict(bits=2, side_bits=4)):
        with pytest.raises(RequestError, match="side_bits is 0"):
            TensorCodec(**bad)
    with pytest.raises(RequestError, match="takes \\+zstd only"):
        registry.adaptive("tokenmix-3+s8")


def test_a_card_carries_its_side_width_and_a_wrong_one_is_invalid(tiny):
    card = tool_card(tiny, "kivi-3+s8")
    header, blobs = card.header, card.blobs
    assert header.format_version == 4 and header.layers[0].value.side_bits == 8
    assert torch.equal(card.got.keys[1], card.expected("key", 1))
    for side_bits, message in ((0, "sizes do not match"), (4, "bad tensor codec")):
        bad = replaced(header)  # fp16 side information would be a size mismatch; 4 bits is no width
        bad.layers[0].key.side_bits = side_bits
        expect_invalid(tiny, bad, blobs, message)
    heads, tokens, dim = card.kv.keys[0].shape  # a NaN scale top in layer 0's K: every scale NaN
    top = packed_size(heads * dim * tokens, 3) + 4
    data = bytearray(blobs[0])
    data[top : top + 2] = torch.tensor([float("nan")], dtype=torch.float16).view(torch.uint8).tolist()
    expect_invalid(tiny, replaced(header), [bytes(data), *blobs[1:]], "non-finite")


@pytest.mark.integration
def test_half_the_side_bytes_for_about_the_same_error_on_a_real_model(embedded):
    """SmolLM2 on a SQuAD context at 2 bits (rotated, pre-RoPE keys): +s8 takes fewer bytes, and
    its error stays within 5% of fp16 side information's."""
    sender = SenderEngine(embedded)
    ids = encode(embedded.tokenizer, sender.prompt.context_part(qa_rows("squad.jsonl", 1)[0]["context"]))
    kv, _ = sender.prefill(ids)
    for kind, tensors in (("key", kv.keys), ("value", kv.values)):
        err, size = [], []
        for name in ("kivi-2+rot+prerope", "kivi-2+rot+prerope+s8"):
            codec = getattr(registry.resolve(name, 1)[0], kind)
            got = reconstructed(tensors, [codec] * len(tensors), embedded.fingerprint, len(ids))
            err.append(sum(float((a - b).pow(2).sum()) for a,
                           b in zip(got, tensors)) / sum(float(t.pow(2).sum()) for t in tensors))
            size.append(sum(encoded_size(codec, *t.shape) for t in tensors))
        assert size[1] < size[0] and err[0] <= err[1] < 1.05 * err[0], (kind, size, err)
