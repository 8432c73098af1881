"""Mixed precision: a calibrated error profile, and the allocators that turn it into codecs.

The profile holds, for every layer, for K and V, and for every candidate codec, the relative
squared reconstruction error sum ||x - x_hat||^2 / sum ||x||^2 over calibration contexts and,
for the KIVI layouts, the KL divergence of the next-token distribution after a question when
only that one tensor is quantized. It is measured once per model and saved as JSON next to
the model cache (or where the user says).

Allocators:
    seed-adaptive  the seed paper: rank layers by their per-tensor error at the lowest width;
                   the most sensitive 30% get 8 bits, the middle 40% 6, the rest 4 (per-tensor).
    budget-B       K per channel, V per token; each of the 2L tensors gets a width in 2..8 or
                   fp16 so that the card's payload (codes, scales, zero points, windows) is at
                   most B bits per element, greedily buying the largest cut in next-token KL
                   per byte (reconstruction error was tried first: it starves the keys, whose
                   small relative errors still move attention; F1 8.3 vs KIVI-3's 13.3 on SQuAD).
                   With 2L tensors the result lands within a step of one tensor's width
                   (1/(2L) bit, 0.017 on a 30-layer model) below B; above 8 bits the only
                   step left is to fp16, so it can land up to 8/(2L) bits below.
    tokenmix-B     token-level mixed precision (QKVShare): the 4 sink tokens in fp16, the
                   context tokens that receive the most attention at 8 bits, the rest at the
                   widest width that leaves room for a tenth of the tokens at 8 bits, with as
                   many 8-bit tokens as the budget B allows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import calibration_data
from .calibration_data import Sample
from .card import encode_tensors
from .codec import KIVI, SEED, LayerCodec
from .kv import KVCache, next_logits, prefill
from .models import LoadedModel
from .profile_file import ProfileFile
from .prompt import PromptFormat, encode
from .quant import FP16_BITS, TensorCodec, dequantize, encoded_size

BITS = (2, 3, 4, 5, 6, 8)
FAMILIES = {"tensor": SEED, "kivi": KIVI}  # name -> (K codec, V codec) for a width
KINDS = ("key", "value")
Shape = tuple[int, int, int]


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
        return len(self.error("kivi", "key", BITS[0]))



def _kl(lm: LoadedModel, kv: KVCache, kind: str, layer: int, approx: torch.Tensor, query: list[int], reference: torch.Tensor) -> float:
    """KL(reference || next-token distribution with one layer's K or V replaced by `approx`)."""
    keys, values = list(kv.keys), list(kv.values)
    (keys if kind == "key" else values)[layer] = approx
    logp = next_logits(lm, KVCache(keys, values), query).log_softmax(-1)
    return float((reference.exp() * (reference - logp)).sum())


def calibrate(lm: LoadedModel, samples: list[Sample], max_tokens: int = 512) -> Profile:
    """Measure every candidate codec on every layer's K and V over the samples' contexts:
    relative reconstruction error, and (KIVI layouts) the KL divergence of the next-token
    distribution after the sample's question when only that tensor is quantized."""
    fmt = PromptFormat.for_tokenizer(lm.tokenizer)
    n_layers = lm.num_layers
    sums: dict = {f: {k: {b: [[0.0, 0.0] for _ in range(n_layers)] for b in BITS} for k in KINDS} for f in FAMILIES}
    kl: dict = {k: {str(b): [0.0] * n_layers for b in BITS} for k in KINDS}
    tokens = 0
    for context, question, _ in samples:
        ids = encode(lm.tokenizer, fmt.context_part(context))[:max_tokens]
        query = encode(lm.tokenizer, fmt.query_part(question))
        tokens += len(ids)
        kv, _ = prefill(lm, ids)
        reference = next_logits(lm, kv, query).log_softmax(-1)
        for family, pair in FAMILIES.items():
            for kind in KINDS:
                tensors = kv.keys if kind == "key" else kv.values
                for bits in BITS:
                    codec = getattr(pair(bits), kind)
                    for layer, (t, blob) in enumerate(zip(tensors, encode_tensors(tensors, [codec] * n_layers))):
                        approx = dequantize(blob, codec, tuple(t.shape), t.dtype)
                        acc = sums[family][kind][bits][layer]
                        acc[0] += float((approx.float() - t.float()).pow(2).sum())
                        acc[1] += float(t.float().pow(2).sum())
                        if family == "kivi":
                            kl[kind][str(bits)][layer] += _kl(lm, kv, kind, layer, approx, query, reference) / len(samples)
    errors = {
        f: {k: {str(b): [e / n if n else 0.0 for e, n in layers] for b, layers in by_bits.items()} for k, by_bits in by_kind.items()}
        for f, by_kind in sums.items()
    }
    return Profile(lm.fingerprint.name, lm.fingerprint.weights_sha256, len(samples), tokens, errors, kl)


def load_or_calibrate(lm: LoadedModel, path: Path | None = None) -> Profile:
    """The saved profile, or one calibrated on the bundled samples (and saved) on first use."""
    return Profile.load_or_make(lm.fingerprint, path, lambda: calibrate(lm, calibration_data.samples()))


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


def budget(profile: Profile, target: float, shapes: list[Shape]) -> list[LayerCodec]:
    """Per-tensor widths for K per channel / V per token that fit `target` bits per element
    (payload of all layers, scales and zero points included) and cut the most error."""
    if len(shapes) != profile.num_layers:
        raise ValueError(f"the profile has {profile.num_layers} layers, the cache {len(shapes)}")
    options: list[list[tuple[TensorCodec, int, float]]] = []  # per tensor: (codec, bytes, error), cheapest first
    for kind in KINDS:
        for layer, shape in enumerate(shapes):
            menu = [(getattr(KIVI(b), kind), profile.sensitivity[kind][str(b)][layer]) for b in BITS]
            menu.append((TensorCodec(FP16_BITS), 0.0))
            options.append([(c, encoded_size(c, *shape), e) for c, e in menu])
    limit = target * 2 * sum(math.prod(s) for s in shapes) / 8
    choice = [0] * len(options)
    total = sum(o[0][1] for o in options)
    if total > limit:
        raise ValueError(
            f"budget-{target:g} is below the smallest allocation here: {_bits_per_element(total, shapes):.2f} bits per "
            f"element at {shapes[0][1]} tokens (scales and zero points weigh more on short contexts)"
        )
    while True:  # buy the upgrade with the largest error cut per extra byte that still fits
        best, best_gain = None, 0.0
        for i, menu in enumerate(options):
            _, size, err = menu[choice[i]]
            for j in range(choice[i] + 1, len(menu)):
                extra = menu[j][1] - size
                if total + extra <= limit and extra > 0 and (err - menu[j][2]) / extra > best_gain:
                    best, best_gain = (i, j), (err - menu[j][2]) / extra
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
    fitting = [w for w in range(TOKENMIX_HIGH - 1, BITS[0] - 1, -1) if size(w, 0) <= limit]
    if not fitting:
        raise ValueError(
            f"tokenmix-{target:g} is below its smallest allocation here: {_bits_per_element(size(BITS[0], 0), shapes):.2f} "
            f"bits per element at {tokens} tokens (the fp16 sink and the scales weigh more on short contexts)"
        )
    low = next((w for w in fitting if size(w, reserve) <= limit), fitting[-1])
    lo, hi = 0, len(ranked)  # the largest count that fits: size grows with the count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(low, mid) <= limit else (lo, mid - 1)
    return [layer(low)] * len(shapes), sorted(ranked[:lo])
