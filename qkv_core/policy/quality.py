"""What each candidate of `codec = "auto"` is, and costs in quality, for one context (its wire bytes:
qkv_core.codec.registry.wire_bytes).

Quality is the calibrated codec profile's: for every layer and K/V, the next-token KL (nats) with
only that tensor KIVI-quantized at a width (qkv_core.codec.allocation.Profile.sensitivity). A
card's predicted loss is the sum over its tensors, a first-order estimate that assumes the
errors add. Text and fp16/fp32 lose nothing (0); a codec the profile did not measure (int8,
seed-B, tokenmix-B, a codec file) has no prediction and cannot be an auto candidate.
"""
from __future__ import annotations

from qkv_core.codec import registry
from qkv_core.codec.allocation import KINDS, Profile, budget
from qkv_core.codec.registry import KIVI, LayerCodec
from qkv_core.errors import RequestError
from qkv_core.types import Fingerprint


def candidate_layers(name: str, profile: Profile, fp: Fingerprint, tokens: int) -> list[LayerCodec]:
    """The per-layer codecs `name` gives a context of `tokens` tokens (budget-B: allocated now)."""
    kind = registry.adaptive(name)
    if kind is None:
        return registry.resolve(name, fp.num_layers)
    if kind.allocator != "budget":
        raise RequestError(f"{name} has no quality prediction; auto candidates are text, fp16, kivi-B and budget-B")
    return budget([profile], kind, [(fp.num_kv_heads, tokens, fp.head_dim)] * fp.num_layers).layers


def quality_loss(layers: list[LayerCodec], profile: Profile) -> float:
    """Predicted next-token KL (nats) of a card coded with `layers`."""
    total = 0.0
    for index, layer in enumerate(layers):
        for kind in KINDS:
            codec = getattr(layer, kind)
            if codec.is_float:
                continue
            if codec.bits not in profile.widths(kind) or codec != getattr(KIVI(codec.bits), kind):
                raise RequestError(f"{registry.spec_of(codec)} has no quality prediction (the profile measures "
                                   f"KIVI layouts at {profile.widths(kind)} bits)")
            total += profile.sensitivity[kind][str(codec.bits)][index]
    return total

