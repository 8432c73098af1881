"""The fused Triton kernels (qkv_core.codec.kernels) against the torch path, byte for byte: natively
on CUDA, through Triton's interpreter on a CPU (chosen by conftest, before triton is imported)."""
from __future__ import annotations

import pytest
import torch

from qkv_core.codec import kernels
from qkv_core.codec.packing import unpack_bits
from qkv_core.codec.quant import dequantize, quantize
from qkv_core.codec.tensor_codec import Entropy, Granularity, TensorCodec
from qkv_core.codec.tools import ROTATION_SEED

pytest.importorskip("triton")
CUDA = torch.cuda.is_available()

DEVICE = torch.device("cuda" if CUDA else "cpu")
KINDS = [Granularity.PER_TOKEN, Granularity.PER_CHANNEL]


def _kv(heads: int, tokens: int, dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spread = torch.linspace(0.1, 8, dim)  # channels of very different ranges, like keys
    return (torch.randn(heads, tokens, dim, generator=g) * spread).to(dtype)


def _torch_path(x: torch.Tensor, codec: TensorCodec) -> torch.Tensor:
    return quantize(x.cpu(), codec)  # on the CPU the codec never takes the kernels


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", range(1, 9))
def test_encode_writes_the_torch_paths_bytes(kind, bits):
    codec = TensorCodec(bits, kind)
    for shape, dtype in (((2, 37, 64), torch.float16), ((1, 70, 128), torch.bfloat16), ((3, 1, 16), torch.float32)):
        x = _kv(*shape, dtype, seed=bits)
        blob = kernels.encode(x.to(DEVICE), codec)
        assert torch.equal(blob.cpu(), _torch_path(x, codec)), (shape, dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_decode_writes_the_torch_paths_values_into_a_slice(kind, bits):
    codec = TensorCodec(bits, kind)
    x = _kv(2, 45, 64, torch.float16, seed=10 + bits)
    blob = _torch_path(x, codec)
    cache = torch.zeros(2, 80, 64, dtype=torch.bfloat16, device=DEVICE)
    out = kernels.decode(blob.to(DEVICE), codec, cache[:, 20:65])
    assert out.data_ptr() == cache[:, 20:65].data_ptr()  # written in place, in the cache
    assert torch.equal(out.cpu(), dequantize(blob, codec, (2, 45, 64), torch.bfloat16))
    assert cache[:, :20].eq(0).all() and cache[:, 65:].eq(0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_rotation_in_the_kernel_gives_the_same_codes_to_within_a_rounding_boundary(kind):
    """+rot is a matrix product whose fp32 sums run in another order than torch's: a code may move by
    one where a value sits on a boundary, the scales and zero points (extremes) barely ever."""
    codec = TensorCodec(2, kind, rotation=ROTATION_SEED)
    x = _kv(3, 50, 128, torch.bfloat16, seed=3)
    mine, theirs = kernels.encode(x.to(DEVICE), codec).cpu(), _torch_path(x, codec)
    n = x.numel()
    codes = [unpack_bits(b[: n * 2 // 8], n, 2).int() for b in (mine, theirs)]
    assert (codes[0] - codes[1]).abs().max() <= 1 and (codes[0] != codes[1]).float().mean() < 1e-3
    back = kernels.decode(theirs.to(DEVICE), codec, torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE))
    reference = dequantize(theirs, codec, tuple(x.shape), torch.float32)
    ulp = reference.abs().clamp_min(1e-3) * 2**-7  # one bf16 step
    assert ((back.cpu().float() - reference).abs() <= ulp).all()


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_constant_rows_strided_inputs_and_bad_values():  # the NaN input warns in the interpreter's numpy
    x = torch.ones(2, 9, 64, dtype=torch.float16)
    x[0, 3] = -2.5  # per token: constant rows; per channel: one value apart
    cache = _kv(2, 40, 64, torch.float16, seed=7)
    for kind in KINDS:
        codec = TensorCodec(3, kind)
        assert torch.equal(kernels.encode(x.to(DEVICE), codec).cpu(), _torch_path(x, codec))
        window = cache[:, 5:30]  # a slice of a cache: not contiguous
        assert torch.equal(kernels.encode(window.to(DEVICE), codec).cpu(), _torch_path(window, codec))
        with pytest.raises(ValueError, match="not finite"):
            kernels.encode(torch.full((1, 4, 64), float("nan"), dtype=torch.float16, device=DEVICE), codec)


def test_the_kernels_take_only_what_they_cover():
    cuda, shape = torch.device("cuda"), (8, 100, 128)
    assert kernels.handles(TensorCodec(2, Granularity.PER_CHANNEL, rotation=ROTATION_SEED), shape, torch.bfloat16, cuda)
    for codec in (TensorCodec(16), TensorCodec(4, Granularity.PER_TENSOR), TensorCodec(4, sink_tokens=4),
                  TensorCodec(4, entropy=Entropy.ZSTD), TensorCodec(4, outliers=10), TensorCodec(4, side_bits=8),
                  TensorCodec(2, salient_bits=8)):
        assert not kernels.handles(codec, shape, torch.float16, cuda), codec
    assert not kernels.handles(TensorCodec(4), (8, 100, 96), torch.float16, cuda)  # head_dim not a power of 2
    assert not kernels.handles(TensorCodec(4), shape, torch.float16, torch.device("cpu"))  # the torch path
