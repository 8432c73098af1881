"""Mixed precision: a calibrated error profile, and the allocators that turn it into codecs.

The profile holds, for every layer, for K and V, and for every candidate codec, the relative
squared reconstruction error sum ||x - x_hat||^2 / sum ||x||^2 over calibration contexts and,
for the KIVI layouts, the KL divergence of the next-token distribution after a question when
only that one tensor is quantized. It is measured once per model and saved as JSON next to
the model cache (or where the user says); qkv_core.engine.calibration measures it with the model.

Allocators:
    seed-adaptive  the seed paper: rank layers by their per-tensor error at the lowest width;
                   the most sensitive 30% get 8 bits, the middle 40% 6, the rest 4 (per-tensor).
    budget-B       K per channel, V per token; each of the 2L tensors gets a width in 1..8 or
                   fp16 so that the card's payload (codes, scales, zero points, windows) is at
                   most B bits per element, greedily buying the largest cut in next-token KL
                   per byte (reconstruction error was tried first: it starves the keys, whose
                   small relative errors still move attention; F1 8.3 vs KIVI-3's 13.3 on SQuAD).
                   With 2L tensors the result lands within a step of one tensor's width
                   (1/(2L) bit, 0.017 on a 30-layer model) below B; above 8 bits the only
                   step left is to fp16, so it can land up to 8/(2L) bits below.
                   budget-B+zstd counts coded bytes: every option is entropy coded and its size
                   measured by coding the cache's tensor, so B holds on the wire after coding.
                   1-bit tensors are a last resort, offered only when B is below the card with
                   every tensor at 2 bits (short contexts, where scales weigh most).
    tokenmix-B     token-level mixed precision (QKVShare): the 4 sink tokens in fp16, the
                   context tokens that receive the most attention at 8 bits, the rest at the
                   widest width that leaves room for a tenth of the tokens at 8 bits, with as
                   many 8-bit tokens as the budget B allows.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qkv_core.codec.encoding import encode_tensors
from qkv_core.codec.quant import FP16_BITS, TensorCodec, encoded_size
from qkv_core.codec.registry import ENTROPY_CODED, KIVI, SEED, Adaptive, LayerCodec, entropy_coded, with_tool
from qkv_core.errors import RequestError
from qkv_core.profile_file import ProfileFile
from qkv_core.types import KVCache

BITS = (1, 2, 3, 4, 5, 6, 8)  # the widths a profile measures (profiles made before 1 was added lack it)
LAST_RESORT_BITS = 1  # budget-B takes 1-bit tensors only when B is below the all-2-bit card
FAMILIES = {"tensor": SEED, "kivi": KIVI}  # name -> (K codec, V codec) for a width
KINDS = ("key", "value")
Shape = tuple[int, int, int]
# (kind, codec) -> the bytes every layer's K ("key") or V ("value") takes under that codec
Sizer = Callable[[str, TensorCodec], list[int]]


@dataclass
class Profile(ProfileFile):
    KIND = "codec"
    texts: int
    tokens: int
    # errors[family][kind][str(bits)][layer]: relative squared reconstruction error
    errors: dict[str, dict[str, dict[str, list[float]]]]
    # sensitivity[kind][str(bits)][layer]: next-token KL (nats) with only that KIVI tensor quantized
    sensitivity: dict[str, dict[str, list[float]]]

    def error(self, family: str, kind: str, bits: int) -> list[float]:
        return self.errors[family][kind][str(bits)]

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.errors["kivi"]["key"].values())))

    def widths(self, kind: str) -> list[int]:
        """The widths this profile measured for K or V, narrowest first."""
        return [b for b in BITS if str(b) in self.sensitivity[kind]]


def seed_adaptive(profile: Profile, widths: tuple[int, int, int] = (8, 6, 4), split: tuple[float, float] = (0.3, 0.4)) -> list[LayerCodec]:
    """The seed paper's allocation: layers ranked by per-tensor error at the lowest width."""
    high, mid, low = widths
    lowest = min(widths)
    sensitivity = [k + v for k, v in zip(profile.error("tensor", "key", lowest), profile.error("tensor", "value", lowest))]
    ranked = sorted(range(len(sensitivity)), key=lambda i: -sensitivity[i])
    n_high = round(split[0] * len(ranked))
    n_mid = round(split[1] * len(ranked))
    bits = [0] * len(ranked)
    for rank, layer in enumerate(ranked):
        bits[layer] = high if rank < n_high else mid if rank < n_high + n_mid else low
    return [SEED(b) for b in bits]


def _bits_per_element(total_bytes: int, shapes: list[Shape]) -> float:
    return 8 * total_bytes / (2 * sum(math.prod(s) for s in shapes))


def coded_sizer(kv: KVCache) -> Sizer:
    """Sizes of entropy-coded options, measured by coding the cache's tensors: they depend on the values."""
    def sizes(kind: str, codec: TensorCodec) -> list[int]:
        tensors = kv.keys if kind == "key" else kv.values
        return [blob.numel() for blob in encode_tensors(tensors, [codec] * len(tensors))]
    return sizes


def budget(profile: Profile, target: float, shapes: list[Shape], coded: Sizer | None = None) -> list[LayerCodec]:
    """Per-tensor widths for K per channel / V per token that fit `target` bits per element
    (payload of all layers, scales and zero points included) and cut the most error. With
    `coded`, every option is entropy coded and `coded` gives its bytes."""
    if len(shapes) != profile.num_layers:
        raise ValueError(f"the profile has {profile.num_layers} layers, the cache {len(shapes)}")
    options: list[list[tuple[TensorCodec, int, float]]] = []  # per tensor: (codec, bytes, error), cheapest first
    for kind in KINDS:
        per_width = []
        for bits in (*profile.widths(kind), FP16_BITS):
            codec = TensorCodec(FP16_BITS) if bits == FP16_BITS else getattr(KIVI(bits), kind)
            codec = entropy_coded(codec) if coded else codec
            sizes = coded(kind, codec) if coded else [encoded_size(codec, *shape) for shape in shapes]
            errors = [0.0] * len(shapes) if bits == FP16_BITS else profile.sensitivity[kind][str(bits)]
            per_width.append([(codec, size, err) for size, err in zip(sizes, errors)])
        options.extend(list(layer) for layer in zip(*per_width))
    limit = target * 2 * sum(math.prod(s) for s in shapes) / 8
    if sum(next(o[1] for o in menu if o[0].bits > LAST_RESORT_BITS) for menu in options) <= limit:
        options = [[o for o in menu if o[0].bits > LAST_RESORT_BITS] for menu in options]
    choice = [0] * len(options)
    total = sum(o[0][1] for o in options)
    if total > limit:
        raise RequestError(
            f"budget-{target:g} is below the smallest allocation here: {_bits_per_element(total, shapes):.2f} bits per "
            f"element at {shapes[0][1]} tokens (scales and zero points weigh more on short contexts)"
        )
    while True:  # buy the upgrade with the largest error cut per extra byte that still fits
        best, best_gain = None, 0.0
        for i, menu in enumerate(options):
            _, size, err = menu[choice[i]]
            for j in range(choice[i] + 1, len(menu)):
                extra, cut = menu[j][1] - size, err - menu[j][2]
                gain = cut / extra if extra > 0 else math.inf if cut > 0 else 0.0  # coded sizes need not grow with width
                if total + extra <= limit and gain > best_gain:
                    best, best_gain = (i, j), gain
        if best is None:
            break
        i, j = best
        total += options[i][j][1] - options[i][choice[i]][1]
        choice[i] = j
    n = len(shapes)
    picked = [options[i][choice[i]][0] for i in range(len(options))]
    return [LayerCodec(picked[layer], picked[n + layer]) for layer in range(n)]


TOKENMIX_SINK = 4
TOKENMIX_HIGH = 8
TOKENMIX_LOW = 2  # the narrowest width of the ordinary tokens


def tokenmix(target: float, shapes: list[Shape], importance: torch.Tensor) -> tuple[list[LayerCodec], list[int]]:
    """(codecs, salient positions): sink tokens in fp16, the most-attended tokens at 8 bits and
    the rest at the widest width that leaves room for a tenth of the tokens at 8 bits, with as
    many 8-bit tokens as the budget allows."""
    tokens = importance.numel()
    limit = target * 2 * sum(math.prod(s) for s in shapes) / 8
    ranked = [p for p in importance.argsort(descending=True).tolist() if p >= TOKENMIX_SINK]

    def layer(low: int) -> LayerCodec:
        kivi = KIVI(low)
        return LayerCodec(*(
            TensorCodec(low, c.granularity, sink_tokens=TOKENMIX_SINK, salient_bits=TOKENMIX_HIGH) for c in (kivi.key, kivi.value)
        ))

    def size(low: int, count: int) -> int:
        salient, codec = sorted(ranked[:count]), layer(low)
        return sum(
            encoded_size(c, h, t, d, sum(1 for p in salient if p >= tokens - t + TOKENMIX_SINK))
            for h, t, d in shapes for c in (codec.key, codec.value)
        )

    reserve = min(len(ranked), max(1, tokens // 10))
    fitting = [w for w in range(TOKENMIX_HIGH - 1, TOKENMIX_LOW - 1, -1) if size(w, 0) <= limit]
    if not fitting:
        raise RequestError(
            f"tokenmix-{target:g} is below its smallest allocation here: {_bits_per_element(size(TOKENMIX_LOW, 0), shapes):.2f} "
            f"bits per element at {tokens} tokens (the fp16 sink and the scales weigh more on short contexts)"
        )
    low = next((w for w in fitting if size(w, reserve) <= limit), fitting[-1])
    lo, hi = 0, len(ranked)  # the largest count that fits: size grows with the count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(low, mid) <= limit else (lo, mid - 1)
    return [layer(low)] * len(shapes), sorted(ranked[:lo])


def allocate(kind: Adaptive, profile: Profile | None, kv: KVCache,
             importance: torch.Tensor | None = None) -> tuple[list[LayerCodec], list[int]]:
    """The per-layer codecs of an adaptive codec for this cache, and its salient positions
    (tokenmix; empty otherwise). `profile` when kind.needs_profile, `importance` (the attention
    each context token receives) when kind.needs_probe. With kind.entropy every tensor is entropy
    coded: budget-B counts the coded bytes, the others allocate as without and then code."""
    shapes = [tuple(k.shape) for k in kv.keys]
    if kind.allocator == "budget":
        assert profile is not None
        return budget(profile, kind.bits, shapes, coded_sizer(kv) if kind.entropy else None), []
    if kind.needs_probe:
        if importance is None:
            raise RequestError(f"{kind.allocator} needs the sender's attention probe")
        layers, salient = tokenmix(kind.bits, shapes, importance)
    else:
        assert profile is not None
        layers, salient = seed_adaptive(profile), []
    return (with_tool(layers, ENTROPY_CODED) if kind.entropy else layers), salient
