"""Named codecs: how every layer's K and V are encoded.

A codec name is either a preset or a spec string:

    fp32              lossless passthrough
    fp16              fp16 passthrough
    int8              8-bit asymmetric, per token, K and V
    seed-B            B-bit per-tensor, K and V (the seed paper's quantizer), B in 2..8
    kivi-B            B-bit, K per channel and V per token (KIVI), B in 1..8
    k=SPEC;v=SPEC[;sink=N][;recent=N]
                      SPEC is BITS/GRANULARITY[/GROUP]: 4/channel, 8/token, 3/group/32,
                      2/tensor, or fp16 / fp32 alone

The same codec applies to every layer; per-layer allocations come from a calibrated profile.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .quant import FP16_BITS, FP32_BITS, Granularity, TensorCodec

_GRANULARITIES = {
    "tensor": Granularity.PER_TENSOR,
    "token": Granularity.PER_TOKEN,
    "channel": Granularity.PER_CHANNEL,
    "group": Granularity.PER_GROUP,
}


@dataclass(frozen=True)
class LayerCodec:
    key: TensorCodec
    value: TensorCodec


def _uniform(codec: TensorCodec, num_layers: int) -> list[LayerCodec]:
    return [LayerCodec(codec, codec)] * num_layers


def _parse_tensor(text: str, sink: int, recent: int) -> TensorCodec:
    if text in ("fp16", "fp32"):
        return TensorCodec(bits=FP16_BITS if text == "fp16" else FP32_BITS)
    parts = text.split("/")
    if len(parts) not in (2, 3) or not parts[0].isdigit() or parts[1] not in _GRANULARITIES:
        raise ValueError(f"bad tensor spec {text!r}: use BITS/GRANULARITY[/GROUP], e.g. 4/channel")
    group = int(parts[2]) if len(parts) == 3 else 0
    return TensorCodec(int(parts[0]), _GRANULARITIES[parts[1]], group, sink, recent)


def _parse_spec(spec: str) -> LayerCodec:
    fields = dict(item.split("=", 1) for item in spec.split(";") if "=" in item)
    unknown = set(fields) - {"k", "v", "sink", "recent"}
    if unknown or "k" not in fields or "v" not in fields:
        raise ValueError(f"bad codec spec {spec!r}: expected k=...;v=...[;sink=N][;recent=N]")
    sink, recent = int(fields.get("sink", 0)), int(fields.get("recent", 0))
    return LayerCodec(_parse_tensor(fields["k"], sink, recent), _parse_tensor(fields["v"], sink, recent))


def resolve(name: str, num_layers: int) -> list[LayerCodec]:
    """The per-layer codecs a codec name stands for; ValueError with the options if unknown."""
    if name in ("fp16", "fp32"):
        return _uniform(TensorCodec(bits=FP16_BITS if name == "fp16" else FP32_BITS), num_layers)
    if name == "int8":
        return _uniform(TensorCodec(8, Granularity.PER_TOKEN), num_layers)
    if m := re.fullmatch(r"seed-([2-8])", name):
        return _uniform(TensorCodec(int(m[1]), Granularity.PER_TENSOR), num_layers)
    if m := re.fullmatch(r"kivi-([1-8])", name):
        bits = int(m[1])
        layer = LayerCodec(TensorCodec(bits, Granularity.PER_CHANNEL), TensorCodec(bits, Granularity.PER_TOKEN))
        return [layer] * num_layers
    if "=" in name:
        return [_parse_spec(name)] * num_layers
    raise ValueError(
        f"unknown codec {name!r}: use fp32, fp16, int8, seed-B, kivi-B or a spec like 'k=4/channel;v=4/token'"
    )
