"""What each candidate of `codec = "auto"` is, and costs in quality, for one context (its wire bytes:
qkv_core.codec.registry.wire_bytes).

Quality is the calibrated codec profiles': for every layer and K/V, the next-token KL (nats) with
only that tensor KIVI-quantized at a width (qkv_core.codec.allocation.Profile.sensitivity), with
the lossy tools each profile was measured with (budget-B+rot+prerope reads the +rot+prerope
profile; +zstd is lossless and moves nothing). A card's predicted loss is the sum over its
tensors, a first-order estimate that assumes the errors add. Text and fp16/fp32 lose nothing (0);
a codec no profile measured (int8, seed-B, tokenmix-B, a codec file, kivi-B with lossy tools) has
no prediction and cannot be an auto candidate. Sizes are layout sizes: a budget is allocated
here without coding, so +zstd candidates are predicted at B bits per element, an upper bound.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from qkv_core.codec import registry
from qkv_core.codec.allocation import KINDS, Profile, budget
from qkv_core.codec.registry import LayerCodec
from qkv_core.codec.tensor_codec import Entropy
from qkv_core.codec.tools import ZSTD
from qkv_core.errors import RequestError
from qkv_core.types import Fingerprint


def profile_sets(codec: registry.Codec) -> tuple[str, ...]:
    """The tools of the profiles that predict `codec` (budget-B: its own; any other: the plain one)."""
    return codec.kind.profile_sets if codec.kind else ("",)


def candidate_layers(codec: registry.Codec, profiles: Sequence[Profile], fp: Fingerprint,
                     tokens: int) -> list[LayerCodec]:
    """The per-layer codecs `codec` gives a context of `tokens` tokens (budget-B: allocated now, from
    `profiles`, one per profile_sets(codec), without coding)."""
    kind = codec.kind
    if kind is None:
        return list(codec.layers)
    if kind.allocator != "budget":
        raise RequestError(f"{codec.name} has no quality prediction; auto candidates are text, fp16, kivi-B and "
                           "budget-B")
    return budget(profiles, kind, [(fp.num_kv_heads, tokens, fp.head_dim)] * fp.num_layers).layers


def quality_loss(layers: list[LayerCodec], profiles: Sequence[Profile]) -> float:
    """Predicted next-token KL (nats) of a card coded with `layers`: each tensor's from the profile
    that measured its codec (entropy coding aside)."""
    total = 0.0
    for index, layer in enumerate(layers):
        for kind in KINDS:
            codec = replace(getattr(layer, kind), entropy=Entropy.NONE)
            if codec.is_float:
                continue
            measured = [p for p in profiles
                        if codec.bits in p.widths(kind) and p.codecs(kind, codec.bits)[index] == codec]
            if not measured:
                tools = " or ".join(p.tools or "no tools" for p in profiles)
                raise RequestError(f"{registry.spec_of(codec)} has no quality prediction (the profiles measure KIVI "
                                   f"layouts with {tools}, {ZSTD.suffix} aside)")
            total += measured[0].sensitivity[kind][str(codec.bits)][index]
    return total

