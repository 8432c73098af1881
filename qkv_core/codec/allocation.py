"""Mixed precision: a calibrated error profile, and the allocators that turn it into codecs.

The profile holds, for every layer, for K and V, and for every candidate codec, the relative
squared reconstruction error sum ||x - x_hat||^2 / sum ||x||^2 over calibration contexts and,
for the KIVI layouts, the KL divergence of the next-token distribution after a question when
only that one tensor is quantized, and the KL when one layer is dropped. A profile is measured
with a set of lossy tools (+rot, +prerope, +s8, +lloyd: every codec of it has them) once per model and saved
as JSON next to the model cache (or where the user says); qkv_core.engine.calibration measures it.

Allocators:
    seed-adaptive  the seed paper: rank layers by their per-tensor error at the lowest width;
                   the most sensitive 30% get 8 bits, the middle 40% 6, the rest 4 (per-tensor).
    budget-B       K per channel, V per token; each of the 2L tensors gets a width in 1..8 or
                   fp16 so that the card (codes, scales, zero points, windows, and the header
                   and framing) is at most B bits per element, greedily buying the largest cut in next-token KL
                   per byte (reconstruction error was tried first: it starves the keys, whose
                   small relative errors still move attention; F1 8.3 vs KIVI-3's 13.3 on SQuAD).
                   With 2L tensors the result lands within a step of one tensor's width
                   (1/(2L) bit, 0.017 on a 30-layer model) below B; above 8 bits the only
                   step left is to fp16, so it can land up to 8/(2L) bits below.
                   budget-B+zstd counts coded bytes: every option is entropy coded and its size
                   measured by coding the cache's tensor, so B holds on the wire after coding.
                   1-bit tensors are a last resort, offered only when B is below the card with
                   every tensor at 2 bits (short contexts, where scales weigh most); so are
                   dropped layers (0 bits, KVComm's selective sharing), where the card may drop:
                   the layers whose loss costs the least KL go first, and the number dropped is
                   the one whose allocation has the least total KL.
                   budget-B+rot, +prerope, +s8: every option has the tool, from a profile measured
                   with it. budget-B+lloyd and +outN read a profile per subset of those two
                   (with and without) and offer every tensor each of them; each menu is cut to
                   its Pareto frontier. A +lloyd profile holds each layer's own K and V levels,
                   fitted when it is calibrated; the options take them.
    tokenmix-B     token-level mixed precision (QKVShare): the 4 sink tokens in fp16, the
                   context tokens that receive the most attention at 8 bits, the rest at the
                   widest width that leaves room for a tenth of the tokens at 8 bits, with as
                   many 8-bit tokens as the budget B allows.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import torch

from qkv_core.codec.encoding import encode_tensors, quantizer_input
from qkv_core.codec.quant import encoded_size
from qkv_core.codec.registry import KIVI, SEED, Adaptive, LayerCodec, split_tools, tooled, with_tools
from qkv_core.codec.tensor_codec import FP16_BITS, TensorCodec
from qkv_core.codec.tools import ZSTD
from qkv_core.errors import RequestError
from qkv_core.profile_file import ProfileFile
from qkv_core.types import Fingerprint, KVCache

BITS = (1, 2, 3, 4, 5, 6, 8)  # the widths a profile measures (profiles made before 1 was added lack it)
LAST_RESORT_BITS = 1  # budget-B takes 1-bit tensors only when B is below the all-2-bit card
FAMILIES = {"tensor": SEED, "kivi": KIVI}  # name -> (K codec, V codec) for a width
KINDS = ("key", "value")
Shape = tuple[int, int, int]
# (kind, codecs) -> the bytes every layer's K ("key") or V ("value") takes under its codec
Sizer = Callable[[str, list[TensorCodec]], list[int]]
# levels[kind][str(bits)][layer]: a layer's non-uniform levels for K or V at a width
Levels = dict[str, dict[str, list[list[float]]]]


@dataclass
class Profile(ProfileFile):
    KIND = "codec"
    texts: int
    tokens: int
    # errors[family][kind][str(bits)][layer]: relative squared reconstruction error
    errors: dict[str, dict[str, dict[str, list[float]]]]
    # sensitivity[kind][str(bits)][layer]: next-token KL (nats) with only that KIVI tensor quantized
    sensitivity: dict[str, dict[str, list[float]]]
    tools: str = ""  # the codec tools every measured codec had ("+rot+prerope"; '' plain, as before tools)
    # dropped[layer]: next-token KL with only that layer dropped (the receiver's own header KV instead);
    # empty where layers cannot be dropped (sliding-window attention) and in profiles made before drops
    dropped: list[float] = field(default_factory=list)
    # with +lloyd: each layer's own levels, fitted on the calibration contexts (qkv_core.codec.levels.fit);
    # empty: the LLOYD tables for every layer (profiles made before per-layer levels were measured with them)
    levels: Levels = field(default_factory=dict)

    def error(self, family: str, kind: str, bits: int) -> list[float]:
        return self.errors[family][kind][str(bits)]

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.errors["kivi"]["key"].values())))

    @classmethod
    def path_for(cls, fp: Fingerprint, path: Path | None, tools: str) -> Path:
        """The file of the profile with `tools`: `path` (default: the model's in the cache) for none,
        a file beside it with the tools in its name otherwise."""
        base = path or cls.default_path(fp)
        return base.with_name(f"{base.stem}{tools}{base.suffix}") if tools else base

    def widths(self, kind: str) -> list[int]:
        """The widths this profile measured for K or V, narrowest first."""
        return [b for b in BITS if str(b) in self.sensitivity[kind]]

    def codecs(self, kind: str, bits: int) -> list[TensorCodec]:
        """Every layer's KIVI codec for K or V at `bits`, as this profile measured it (its tools,
        and each layer's own levels)."""
        return kivi_codecs(kind, bits, split_tools(self.tools)[1], self.levels, self.num_layers)


def kivi_codecs(kind: str, bits: int, tools: Sequence[str], levels: Levels, num_layers: int) -> list[TensorCodec]:
    """Every layer's KIVI codec for K ("key") or V at `bits` with `tools`; where the codec has
    non-uniform levels and `levels` holds the width's, each layer takes its own."""
    codec = tooled(getattr(KIVI(bits), kind), kind, tools)
    fitted = levels.get(kind, {}).get(str(bits)) if codec.levels else None
    return [replace(codec, levels=tuple(x)) for x in fitted] if fitted else [codec] * num_layers


def seed_adaptive(profile: Profile, widths: tuple[int, int, int] = (8, 6, 4),
                  split: tuple[float, float] = (0.3, 0.4)) -> list[LayerCodec]:
    """The seed paper's allocation: layers ranked by per-tensor error at the lowest width."""
    high, mid, low = widths
    lowest = min(widths)
    sensitivity = [k + v for k,
                   v in zip(profile.error("tensor", "key", lowest), profile.error("tensor", "value", lowest))]
    ranked = sorted(range(len(sensitivity)), key=lambda i: -sensitivity[i])
    n_high = round(split[0] * len(ranked))
    n_mid = round(split[1] * len(ranked))
    bits = [0] * len(ranked)
    for rank, layer in enumerate(ranked):
        bits[layer] = high if rank < n_high else mid if rank < n_high + n_mid else low
    return [SEED(b) for b in bits]


def _bits_per_element(total_bytes: int, shapes: list[Shape]) -> float:
    return 8 * total_bytes / (2 * sum(math.prod(s) for s in shapes))


@dataclass(frozen=True)
class CardTarget:
    """What a card's allocation respects besides its budget; the sender, which knows the context, sets it."""

    fp: Fingerprint | None = None  # the model: pre-RoPE keys are coded (and so sized) with its RoPE
    context_tokens: int | None = None  # the context length the cache ends at (default: its tokens)
    overhead_bytes: int = 0  # the card's bytes besides its layers' payload (header, framing): B pays for them too
    may_drop: bool = False  # layers may travel as nothing (full attention, a whole card for this model)


@dataclass
class Allocation:
    layers: list[LayerCodec]  # one per model layer
    salient: list[int] = field(default_factory=list)  # tokenmix: the positions at the salient width
    selected: list[int] | None = None  # budget-B with drops: the layers sent (ascending); None: all


def coded_sizer(kv: KVCache, card: CardTarget) -> Sizer:
    """Sizes of entropy-coded options, measured by coding the cache's tensors: they depend on the values.

    Rotation and pre-RoPE keys move values, not bytes: the tensors as they leave them are made once
    per tool set and every width codes those without the two tools, to the same bytes (half the
    time of sizing budget-2+rot+prerope+zstd's options on a 1,024-token cache)."""
    context_tokens = kv.tokens if card.context_tokens is None else card.context_tokens
    inputs: dict[tuple, list[torch.Tensor]] = {}  # (kind, each codec's rotation and pre-RoPE) -> the tensors they make

    def sizes(kind: str, codecs: list[TensorCodec]) -> list[int]:
        key = (kind, *((c.rotation, c.pre_rope) for c in codecs))
        if key not in inputs:
            tensors = kv.keys if kind == "key" else kv.values
            inputs[key] = [quantizer_input(t, c, card.fp, context_tokens) for t, c in zip(tensors, codecs)]
        plain = [replace(c, rotation=0, pre_rope=False) for c in codecs]
        return [blob.numel() for blob in encode_tensors(inputs[key], plain)]
    return sizes


Option = tuple[TensorCodec, int, float]  # (codec, bytes, calibrated error)


T = TypeVar("T")


def frontier(items: Iterable[T], cost: Callable[[T], float], error: Callable[[T], float]) -> list[T]:
    """The Pareto frontier: the items no other beats with less error at no more cost, cheapest first."""
    out: list[T] = []
    for item in sorted(items, key=lambda i: (cost(i), error(i))):
        if not out or error(item) < error(out[-1]):
            out.append(item)
    return out


def _greedy(menus: list[list[Option]], limit: float) -> list[int] | None:
    """Per menu the option chosen (menus cheapest first), buying the upgrade with the largest error
    cut per extra byte that still fits, from the cheapest; None if the cheapest do not fit."""
    choice = [0] * len(menus)
    total = sum(menu[0][1] for menu in menus)
    if total > limit:
        return None
    while True:
        best, best_gain = None, 0.0
        for i, menu in enumerate(menus):
            _, size, err = menu[choice[i]]
            for j in range(choice[i] + 1, len(menu)):
                extra, cut = menu[j][1] - size, err - menu[j][2]
                gain = cut / extra
                if total + extra <= limit and gain > best_gain:
                    best, best_gain = (i, j), gain
        if best is None:
            return choice
        i, j = best
        total += menus[i][j][1] - menus[i][choice[i]][1]
        choice[i] = j


def budget(profiles: Sequence[Profile], kind: Adaptive, shapes: list[Shape], card: CardTarget = CardTarget(),
           coded: Sizer | None = None) -> Allocation:
    """Per-tensor widths for K per channel / V per token, with kind's tools, that fit kind.bits bits
    per element (every layer's payload, scales and zero points, and card.overhead_bytes) and cut
    the most calibrated error. `profiles`: one per kind.profile_sets, each offering its codecs
    to every tensor. With `coded`, every option is entropy coded and `coded` gives its bytes.
    Below the all-2-bit card, 1-bit tensors and (card.may_drop) dropped layers compete too: the d
    layers whose loss costs least are dropped, for the d whose allocation errs least."""
    if [p.tools for p in profiles] != list(kind.profile_sets):
        raise ValueError(f"{kind.allocator}{kind.profile_tools} needs profiles calibrated with "
                         f"{' and '.join(t or 'no tools' for t in kind.profile_sets)}, not "
                         f"{[p.tools or 'none' for p in profiles]}")
    if any(len(shapes) != p.num_layers for p in profiles):
        raise ValueError(f"the profile has {profiles[0].num_layers} layers, the cache {len(shapes)}")
    options: list[list[Option]] = []  # per tensor (every K, then every V)
    for kv_kind in KINDS:
        per_codec = [(p.codecs(kv_kind, bits),
                      p.sensitivity[kv_kind][str(bits)]) for p in profiles for bits in p.widths(kv_kind)]
        per_codec.append(([TensorCodec(FP16_BITS)] * len(shapes), [0.0] * len(shapes)))
        per_option = []
        for codecs, errors in per_codec:
            codecs = [ZSTD.apply(c, 0) for c in codecs] if coded else codecs  # +zstd is `coded`: no profile has it
            sizes = coded(kv_kind, codecs) if coded else [encoded_size(c, *shape) for c, shape in zip(codecs, shapes)]
            per_option.append(list(zip(codecs, sizes, errors)))
        options.extend(list(layer) for layer in zip(*per_option))
    limit = kind.bits * 2 * sum(math.prod(s) for s in shapes) / 8 - card.overhead_bytes
    last_resort = sum(min(o[1] for o in menu if o[0].bits > LAST_RESORT_BITS) for menu in options) > limit
    if not last_resort:
        options = [[o for o in menu if o[0].bits > LAST_RESORT_BITS] for menu in options]
    options = [frontier(menu, cost=lambda o: o[1], error=lambda o: o[2]) for menu in options]
    n = len(shapes)
    harm = profiles[0].dropped if last_resort and card.may_drop else []
    order = sorted(range(n), key=harm.__getitem__) if harm else []  # cheapest to lose first
    best: tuple[float, list[int], list[int]] | None = None  # (error, layers kept, choice per kept tensor)
    for drops in range(max(1, len(order))):  # keep one layer at least
        kept = sorted(set(range(n)) - set(order[:drops]))
        menus = [options[t] for t in (*kept, *(n + i for i in kept))]
        choice = _greedy(menus, limit)
        if choice is None:
            continue
        error = sum(menu[c][2] for menu, c in zip(menus, choice)) + sum(harm[i] for i in order[:drops])
        if best is None or error < best[0]:
            best = (error, kept, choice)
    if best is None:
        smallest = (sum(menu[0][1] for menu in options) if not order
                    else min(options[i][0][1] + options[n + i][0][1] for i in range(n)))
        raise RequestError(
            f"{kind.allocator}-{kind.bits:g} is below the smallest allocation here: "
            f"{_bits_per_element(smallest + card.overhead_bytes, shapes):.2f} bits per element at {shapes[0][1]} "
            "tokens (scales, zero points and the header weigh more on short contexts)"
        )
    _, kept, choice = best
    picked = [menu[0][0] for menu in options]  # a dropped layer's codecs are never used
    for t, c in zip((*kept, *(n + i for i in kept)), choice):
        picked[t] = options[t][c][0]
    return Allocation([LayerCodec(picked[layer], picked[n + layer]) for layer in range(n)],
                      selected=kept if len(kept) < n else None)


TOKENMIX_SINK = 4
TOKENMIX_HIGH = 8
TOKENMIX_LOW = 2  # the narrowest width of the ordinary tokens


def tokenmix(target: float, shapes: list[Shape], importance: torch.Tensor,
             overhead_bytes: int = 0) -> tuple[list[LayerCodec], list[int]]:
    """(codecs, salient positions): sink tokens in fp16, the most-attended tokens at 8 bits and
    the rest at the widest width that leaves room for a tenth of the tokens at 8 bits, with as
    many 8-bit tokens as the budget allows (the card's `overhead_bytes` paid for too)."""
    tokens = importance.numel()
    limit = target * 2 * sum(math.prod(s) for s in shapes) / 8 - overhead_bytes
    ranked = [p for p in importance.argsort(descending=True).tolist() if p >= TOKENMIX_SINK]

    def layer(low: int) -> LayerCodec:
        kivi = KIVI(low)
        return LayerCodec(*(
            TensorCodec(low, c.granularity, sink_tokens=TOKENMIX_SINK, salient_bits=TOKENMIX_HIGH)
            for c in (kivi.key, kivi.value)
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
            f"tokenmix-{target:g} is below its smallest allocation here: "
            f"{_bits_per_element(size(TOKENMIX_LOW, 0), shapes):.2f} bits per element at {tokens} tokens "
            "(the fp16 sink and the scales weigh more on short contexts)"
        )
    low = next((w for w in fitting if size(w, reserve) <= limit), fitting[-1])
    lo, hi = 0, len(ranked)  # the largest count that fits: size grows with the count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(low, mid) <= limit else (lo, mid - 1)
    return [layer(low)] * len(shapes), sorted(ranked[:lo])


def allocate(kind: Adaptive, profiles: Sequence[Profile], kv: KVCache, importance: torch.Tensor | None = None,
             card: CardTarget = CardTarget()) -> Allocation:
    """The allocation of an adaptive codec for this cache. `profiles` (one per kind.profile_sets)
    when kind.needs_profile, `importance` (the attention each context token receives) when
    kind.needs_probe. With kind.entropy every tensor is entropy coded: budget-B counts the coded
    bytes, the others allocate as without and then code."""
    shapes: list[Shape] = [(k.shape[0], k.shape[1], k.shape[2]) for k in kv.keys]
    if kind.allocator == "budget":
        return budget(profiles, kind, shapes, card, coded_sizer(kv, card) if kind.entropy else None)
    if kind.needs_probe:
        if importance is None:
            raise RequestError(f"{kind.allocator} needs the sender's attention probe")
        layers, salient = tokenmix(kind.bits, shapes, importance, card.overhead_bytes)
    else:
        layers, salient = seed_adaptive(profiles[0]), []
    return Allocation(with_tools(layers, kind.tools), salient)
