"""Re-encoding a card at fewer bits: what the receiver's store does to cold cards under memory
pressure before it drops any (qkv_core.store).

Each tensor's codec steps down once: fp16/fp32 passthrough becomes 8 bits per token; B bits
become B-2 (never below 2); granularity, groups, fp16 windows, salient widths, entropy coding
and pre-RoPE keys stay. A card
already at 2 bits everywhere cannot step down (None). The result is a valid card of its own:
new layer specs and sizes, its codec name marked, its id its new content hash.
"""
from __future__ import annotations

import dataclasses

import torch

from qkv_core.card.convert import codec_from_pb, codec_to_pb, fingerprint_from_pb
from qkv_core.card.naming import name_card
from qkv_core.codec.encoding import encode_tensors, layer_salient
from qkv_core.codec.quant import dequantize
from qkv_core.codec.tensor_codec import Granularity, TensorCodec
from qkv_core.wire import pb

MIN_BITS = 2
REENCODED = " (re-encoded)"  # marks the codec name of a card the store squeezed


def step_down(c: TensorCodec) -> TensorCodec | None:
    """The next smaller codec, None when `c` is already at the floor."""
    if c.is_float:  # the tensors are re-encoded as decoded: pre-RoPE keys stay pre-RoPE
        return TensorCodec(8, Granularity.PER_TOKEN, sink_tokens=c.sink_tokens, recent_tokens=c.recent_tokens,
                           entropy=c.entropy, pre_rope=c.pre_rope)
    if c.bits <= MIN_BITS:
        return None
    return dataclasses.replace(c, bits=max(MIN_BITS, c.bits - 2))


def reencode(header: pb.CardHeader, blobs: list[bytes]) -> tuple[pb.CardHeader, list[bytes]] | None:
    """The card one step smaller (its tensors dequantized to fp32 on the CPU and quantized again),
    or None if no tensor can step down."""
    fp = fingerprint_from_pb(header.model)
    out = pb.CardHeader()
    out.CopyFrom(header)
    new_blobs, changed = [], False
    for spec, out_spec, blob in zip(header.layers, out.layers, blobs):
        old = codec_from_pb(spec.key), codec_from_pb(spec.value)
        new = tuple(step_down(c) or c for c in old)
        changed |= new != old
        shape = (fp.num_kv_heads, spec.tokens, fp.head_dim)
        data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        parts = data[: spec.key_bytes], data[spec.key_bytes:]
        tensors = [dequantize(part, c, shape, torch.float32,
                              layer_salient(header.salient_tokens, header.context_tokens, spec.tokens, c))
                   for part, c in zip(parts, old)]
        k, v = encode_tensors(tensors, list(new), header.salient_tokens, header.context_tokens)
        new_blobs.append(torch.cat([k, v]).numpy().tobytes())
        out_spec.key.CopyFrom(codec_to_pb(new[0]))
        out_spec.value.CopyFrom(codec_to_pb(new[1]))
        out_spec.key_bytes, out_spec.value_bytes = k.numel(), v.numel()
    if not changed:
        return None
    out.payload_bytes = sum(map(len, new_blobs))
    out.codec = header.codec if header.codec.endswith(REENCODED) else header.codec + REENCODED
    name_card(out, new_blobs)
    return out, new_blobs
