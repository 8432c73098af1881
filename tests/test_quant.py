import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv_core.codec.quant import _rows, dequantize, encoded_size, quantize
from qkv_core.codec.tensor_codec import Granularity, TensorCodec


def _as_rows(x: torch.Tensor, codec: TensorCodec) -> torch.Tensor:
    """x as one row per (scale, zero), rows in the order the scales are stored."""
    shape = _rows(codec, *x.shape)
    if codec.granularity == Granularity.PER_CHANNEL:
        x = x.transpose(1, 2)
    return x.reshape(shape)


def _scales(blob: torch.Tensor, codec: TensorCodec, shape) -> torch.Tensor:
    """Read the stored fp16 scales back out of a blob (layout: codes, scales, zeros, windows)."""
    from qkv_core.codec.packing import packed_size
    from qkv_core.codec.quant import _rows, fp16_windows

    heads, tokens, dim = shape
    sink, recent = fp16_windows(codec, tokens)
    rows, width = _rows(codec, heads, tokens - sink - recent, dim)
    start = packed_size(rows * width, codec.bits)
    return blob[start : start + 2 * rows].clone().view(torch.float16).float()


@settings(max_examples=150, deadline=None)
@given(
    bits=st.sampled_from([1, 2, 3, 4, 5, 6, 8]),
    granularity=st.sampled_from(list(Granularity)),
    heads=st.integers(1, 3),
    tokens=st.integers(1, 12),
    sink=st.integers(0, 3),
    recent=st.integers(0, 3),
    scale=st.floats(1e-3, 50),
    seed=st.integers(0, 2**16),
)
def test_error_within_half_a_step(bits, granularity, heads, tokens, sink, recent, scale, seed):
    dim = 8
    codec = TensorCodec(bits, granularity, group_size=4, sink_tokens=sink, recent_tokens=recent)
    x = torch.randn(heads, tokens, dim, generator=torch.Generator().manual_seed(seed)) * scale
    original = x.clone()
    blob = quantize(x, codec)
    assert torch.equal(x, original)  # the input is never modified
    assert blob.numel() == encoded_size(codec, heads, tokens, dim)
    y = dequantize(blob, codec, x.shape, torch.float32)
    assert torch.isfinite(y).all()
    s, r = min(sink, tokens), min(recent, tokens - min(sink, tokens))
    # fp16 windows are exact up to fp16 rounding
    window = torch.cat([x[:, :s], x[:, tokens - r :]], dim=1)
    window_hat = torch.cat([y[:, :s], y[:, tokens - r :]], dim=1)
    assert torch.allclose(window_hat, window.half().float())
    middle, middle_hat = x[:, s : tokens - r], y[:, s : tokens - r]
    if middle.shape[1] == 0:
        return
    rows = _as_rows(middle, codec)
    err = (_as_rows(middle_hat, codec) - rows).abs()
    step = _scales(blob, codec, x.shape).unsqueeze(1)
    assert (err <= step / 2 + 1e-5 * rows.abs() + 1e-6).all()


@pytest.mark.parametrize("granularity", list(Granularity))
def test_constant_rows_are_exact_not_nan(granularity):
    x = torch.full((2, 5, 8), 0.3125)  # representable in fp16
    if granularity != Granularity.PER_TENSOR:
        x[1] = -2.0  # constant within every row, different across rows
    codec = TensorCodec(4, granularity, group_size=4)
    y = dequantize(quantize(x, codec), codec, x.shape, torch.float32)
    assert torch.equal(y, x)


def test_golden_blob_layout():
    # One head, two tokens, two channels, per-token 2-bit: row 0 = [0, 3], row 1 = [1, 1].
    x = torch.tensor([[[0.0, 3.0], [1.0, 1.0]]])
    blob = quantize(x, TensorCodec(2, Granularity.PER_TOKEN))
    codes = [0b11_00 | 0b00_00 << 4]  # row 0 -> codes 0, 3; row 1 -> codes 0, 0 (constant row)
    scales = torch.tensor([1.0, 0.0], dtype=torch.float16).view(torch.uint8).tolist()
    zeros = torch.tensor([0.0, 1.0], dtype=torch.float16).view(torch.uint8).tolist()
    assert blob.tolist() == codes + scales + zeros


def test_float_passthrough_sizes_and_exactness():
    x = torch.randn(2, 7, 16)
    assert quantize(x, TensorCodec(bits=32)).numel() == 4 * x.numel()
    assert torch.equal(dequantize(quantize(x, TensorCodec(bits=32)), TensorCodec(bits=32), x.shape, torch.float32), x)
    y = dequantize(quantize(x, TensorCodec(bits=16)), TensorCodec(bits=16), x.shape, torch.float32)
    assert torch.equal(y, x.half().float())


def test_bad_values_and_specs_are_refused():
    with pytest.raises(ValueError, match="not finite"):
        quantize(torch.tensor([[[float("nan"), 1.0]]]), TensorCodec(4, Granularity.PER_TOKEN))
    for bad in (1e6, float("nan"), float("-inf")):  # beyond fp16, and what a max-reduction must still catch
        with pytest.raises(ValueError, match="not finite"):
            quantize(torch.tensor([[[1.0, bad, 2.0]]]), TensorCodec(16))
    with pytest.raises(ValueError, match="not finite"):
        quantize(torch.tensor([[[1.0, float("nan")]]]), TensorCodec(32))
    with pytest.raises(ValueError, match="does not divide"):
        quantize(torch.zeros(1, 2, 6), TensorCodec(4, Granularity.PER_GROUP, group_size=4))
    with pytest.raises(ValueError, match="bits"):
        TensorCodec(bits=12)
    with pytest.raises(ValueError, match="does not match"):
        dequantize(torch.zeros(3, dtype=torch.uint8), TensorCodec(4, Granularity.PER_TOKEN), (1, 2, 8), torch.float32)


@pytest.mark.parametrize("granularity", list(Granularity))
def test_salient_tokens_are_their_own_part_at_their_own_width(granularity):
    x = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(3))
    codec = TensorCodec(2, granularity, group_size=4, sink_tokens=2, recent_tokens=1, salient_bits=8)
    salient = torch.tensor([1, 4, 5])  # indices into the 9 quantized middle tokens
    blob = quantize(x, codec, salient)
    assert blob.numel() == encoded_size(codec, 2, 12, 8, salient=3)
    middle = x[:, 2:11]
    ordinary = [i for i in range(9) if i not in salient.tolist()]
    low, high = TensorCodec(2, granularity, group_size=4), TensorCodec(8, granularity, group_size=4)
    expected = torch.cat([
        quantize(middle[:, ordinary], low), quantize(middle[:, salient], high),
        quantize(x[:, :2], TensorCodec(16)), quantize(x[:, 11:], TensorCodec(16)),
    ])
    assert torch.equal(blob, expected)  # the byte layout: ordinary part, salient part, windows
    y = dequantize(blob, codec, x.shape, torch.float32, salient)
    err = (y - x).abs()[:, 2:11]
    assert err[:, salient].max() < err[:, ordinary].max() / 10
    with pytest.raises(ValueError, match="does not match"):
        dequantize(blob, codec, x.shape, torch.float32)  # without the salient set the sizes disagree
