"""Fused Triton kernels for the KIVI layouts: encode from the device's KV straight into the card's
bytes, decode from them straight into a cache tensor. One pass each, no staging copies.

What they cover (`handles`): integer codecs at 1..8 bits, per token (V) or per channel (K), fp16
scales and zero points, with or without +rot, head_dim a power of two >= 16; no fp16 windows,
salient tokens, outliers, non-uniform levels, compact side information or +zstd (whose codes are
laid out at an aligned width, per-channel ones channel-major): those stay on the torch path,
qkv_core.codec.quant.

The bytes are the card format of qkv_core.codec.quant, computed the same way: min and max per row,
the zero point rounded down and the scale rounded up to fp16, code = trunc((x - (zero - scale/2))
* (1/scale)), divisions correctly rounded (div_rn), codes packed LSB first (qkv_core.codec.packing;
a row of D codes at B bits is D*B/8 whole bytes). Without +rot the encoded bytes equal the torch
path's bit for bit (tests/test_kernels.py, under TRITON_INTERPRET=1 on a CPU and natively on
CUDA). With +rot the rotation is a matrix product in the kernel, whose fp32 sums run in another
order than torch's: a code can differ by one where a value sits on a rounding boundary. Decoding
computes code * scale + zero in fp32 and rounds once to the output dtype.

Triton is optional (`pip install triton`, or the `gpu` extra): without it, or off CUDA, `handles`
is False and the torch path runs. Tests run the kernels on the CPU through Triton's interpreter.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch

from qkv_core.codec.rotation import _matrices
from qkv_core.codec.tensor_codec import Entropy, Granularity, TensorCodec

AVAILABLE = importlib.util.find_spec("triton") is not None


def handles(codec: TensorCodec, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the kernels encode and decode `codec` for CUDA tensors of `shape` ([heads, tokens,
    dim]) and `dtype` (quant.py calls them then; on a CPU, tests call them through Triton's
    interpreter)."""
    return (AVAILABLE and device.type == "cuda" and supports(codec) and len(shape) == 3
            and shape[-1] >= 16 and shape[-1] & (shape[-1] - 1) == 0
            and dtype in (torch.float16, torch.bfloat16, torch.float32))


def supports(codec: TensorCodec) -> bool:
    return (not codec.is_float and codec.granularity in (Granularity.PER_TOKEN, Granularity.PER_CHANNEL)
            and not (codec.sink_tokens or codec.recent_tokens or codec.salient_bits or codec.outliers
                     or codec.levels or codec.side_bits or codec.entropy != Entropy.NONE))


_BT = 32  # token rows per program


def _geometry(codec: TensorCodec, heads: int, tokens: int, dim: int) -> tuple[int, int, int]:
    """(code bytes, rows of (scale, zero), the packing's bytes per word rounded up to a power of 2)."""
    rows = heads * tokens if codec.granularity == Granularity.PER_TOKEN else heads * dim
    return heads * tokens * dim * codec.bits // 8, rows, 1 << (codec.bits - 1).bit_length()


def _rotation(codec: TensorCodec, heads: int, dim: int, device: torch.device) -> torch.Tensor:
    if not codec.rotation:
        return torch.empty(1, device=device)
    return _matrices(codec.rotation, heads, dim, device).contiguous()


def encode(x: torch.Tensor, codec: TensorCodec) -> torch.Tensor:
    """The blob qkv_core.codec.quant.quantize makes of `x` (before the +zstd blob hook), on x's device."""
    from qkv_core.codec.triton_kivi import channel_stats, encode_per_channel, encode_per_token  # noqa: PLC0415
    heads, tokens, dim = x.shape
    code_bytes, rows, packed = _geometry(codec, heads, tokens, dim)
    blob = torch.empty(code_bytes + 4 * rows, dtype=torch.uint8, device=x.device)
    if not tokens:
        return blob
    sides = blob[code_bytes:].view(torch.float16)  # scales, then zero points: 2-byte aligned (code_bytes is even)
    rot = _rotation(codec, heads, dim, x.device)
    x = x if x.stride(-1) == 1 else x.contiguous()
    grid = (heads, -(-tokens // _BT))
    # no fused multiply-adds: each product and sum rounds as torch's separate ops do
    common = {"D": dim, "B": codec.bits, "BT": _BT, "ROT": bool(codec.rotation), "enable_fp_fusion": False}
    if codec.granularity == Granularity.PER_TOKEN:
        encode_per_token[grid](x, rot, blob, sides, tokens, x.stride(0), x.stride(1), rows, BP=packed, **common)
    else:
        stats = torch.empty(heads, 2, dim, dtype=torch.float32, device=x.device)
        channel_stats[(heads,)](x, rot, stats, sides, tokens, x.stride(0), x.stride(1), rows, **common)
        encode_per_channel[grid](x, rot, blob, stats, tokens, x.stride(0), x.stride(1), BP=packed, **common)
    if not torch.isfinite(sides[:rows].float().amax()):  # one reduction: NaN and inf propagate through max
        raise ValueError("KV values are not finite, or their range exceeds fp16; use a finer granularity or fp16")
    return blob


def decode(blob: torch.Tensor, codec: TensorCodec, out: torch.Tensor) -> torch.Tensor:
    """Decode a blob (after the +zstd blob hook) into `out` ([heads, tokens, dim], any float dtype,
    rows of stride 1: a slice of a cache tensor is written in place), which it returns."""
    heads, tokens, dim = out.shape
    code_bytes, rows, packed = _geometry(codec, heads, tokens, dim)
    if blob.numel() != code_bytes + 4 * rows:
        raise ValueError(f"blob of {blob.numel()} bytes does not match {codec} for shape {tuple(out.shape)}")
    if not tokens:
        return out
    sides = blob[code_bytes:].view(torch.float16)
    grid = (heads, -(-tokens // _BT))
    from qkv_core.codec.triton_kivi import decode as decode_kernel  # noqa: PLC0415

    decode_kernel[grid](blob, sides, _rotation(codec, heads, dim, blob.device), out, tokens, out.stride(0),
                        out.stride(1), rows, D=dim, B=codec.bits, BT=_BT, BP=packed,
                        PER_TOKEN=codec.granularity == Granularity.PER_TOKEN, ROT=bool(codec.rotation),
                        enable_fp_fusion=False)
    return out
