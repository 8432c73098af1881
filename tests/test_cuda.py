"""The GPU path (skipped without CUDA): the codec on CUDA writes the bytes the CPU writes, and a
CUDA receiver injecting a card computes what a CPU receiver computes."""
from __future__ import annotations

import pytest
import torch
from conftest import CORPUS, tiny_model

from qkv_core.card.framing import frames
from qkv_core.codec import registry as codecs
from qkv_core.codec.quant import dequantize, quantize
from qkv_core.codec.tensor_codec import Granularity, TensorCodec
from qkv_core.engine.receiver import ReceiverEngine
from qkv_core.engine.selection import SelectionConfig
from qkv_core.engine.sender import SenderEngine
from qkv_core.model.kv import next_logits
from qkv_core.model.loading import wrap
from qkv_core.model.prompt import encode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PRESETS = ["fp16", "int8", "seed-4", "kivi-4", "kivi-3", "kivi-2"]


@pytest.mark.parametrize("preset", PRESETS)
def test_codec_on_cuda_writes_the_cpu_bytes(preset):
    torch.manual_seed(1)
    x = torch.randn(3, 333, 64) * torch.linspace(0.1, 8, 64)  # channels of very different ranges, like keys
    layer = codecs.resolve(preset, 1)[0]
    for codec in (layer.key, layer.value):
        cpu = quantize(x, codec)
        gpu = quantize(x.cuda(), codec)
        assert gpu.device.type == "cuda"
        assert torch.equal(cpu, gpu.cpu())
        back = dequantize(gpu, codec, tuple(x.shape), torch.float32)
        assert torch.equal(back.cpu(), dequantize(cpu, codec, tuple(x.shape), torch.float32))


def test_compact_side_information_on_cuda_reads_as_on_the_cpu():
    """+s8's grids go through log2 and exp2, whose last bit may differ between devices: a card
    written on one decodes on the other to within fp32 rounding, and either's codes cover the rows."""
    torch.manual_seed(1)
    x = torch.randn(3, 333, 64) * torch.linspace(0.1, 8, 64)
    compact, plain = codecs.resolve("kivi-2+rot+s8", 1)[0], codecs.resolve("kivi-2+rot", 1)[0]
    for kind in ("key", "value"):
        codec, reference = getattr(compact, kind), getattr(plain, kind)
        cpu, gpu = quantize(x, codec), quantize(x.cuda(), codec)
        for blob in (cpu, gpu):
            here = dequantize(blob.cpu(), codec, tuple(x.shape), torch.float32)
            there = dequantize(blob.cuda(), codec, tuple(x.shape), torch.float32).cpu()
            assert torch.allclose(here, there, rtol=1e-5, atol=1e-5)
        err = float((dequantize(gpu, codec, tuple(x.shape), torch.float32).cpu() - x).norm() / x.norm())
        assert err < 1.05 * float((dequantize(quantize(x, reference), reference, tuple(x.shape),
                                              torch.float32) - x).norm() / x.norm())


def test_salient_tokens_on_cuda_with_positions_from_the_cpu():
    """tokenmix: the sender's attention probe gives salient positions on the CPU."""
    torch.manual_seed(2)
    x = torch.randn(3, 200, 64)
    codec = TensorCodec(3, Granularity.PER_CHANNEL, sink_tokens=4, salient_bits=8)
    salient = torch.tensor([0, 7, 50, 51, 190])
    cpu = quantize(x, codec, salient)
    gpu = quantize(x.cuda(), codec, salient)
    assert torch.equal(cpu, gpu.cpu())
    back = dequantize(gpu, codec, tuple(x.shape), torch.float32, salient)
    assert torch.equal(back.cpu(), dequantize(cpu, codec, tuple(x.shape), torch.float32, salient))


@pytest.mark.parametrize("layers", [SelectionConfig(), SelectionConfig(0.5, "prior")])
@pytest.mark.parametrize("preset", ["fp16", "kivi-4"])
def test_cuda_receiver_matches_cpu_receiver(preset, layers):
    cpu_lm = tiny_model(seed=3, layers=4)
    gpu_model = tiny_model(seed=3, layers=4)
    gpu_lm = wrap(cpu_lm.fingerprint.name, gpu_model.model.cuda(), gpu_model.tokenizer)
    assert gpu_lm.fingerprint == cpu_lm.fingerprint
    card = SenderEngine(cpu_lm).prepare(CORPUS[0], preset, layers=layers)
    stream = list(frames(card.header, card.blobs))
    ids = encode(cpu_lm.tokenizer, "Q: when is the summit?\nA:")
    logits = []
    for lm in (cpu_lm, gpu_lm):
        stored = ReceiverEngine(lm).accept(stream)
        assert all(k.device.type == lm.device.type for k in stored.kv.keys)
        logits.append(next_logits(lm, stored.kv, ids).cpu())
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
