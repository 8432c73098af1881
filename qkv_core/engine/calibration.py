"""Measuring a codec profile with the model (qkv_core.codec.allocation holds the profile and
the allocators that read it): every candidate codec on every layer's K and V, over calibration
contexts, as reconstruction error and as next-token KL, and the KL of dropping each layer. With
+lloyd it first fits each layer's K and V levels on the same contexts, then measures with them."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from qkv_core import bundled
from qkv_core.bundled import Sample
from qkv_core.codec import levels
from qkv_core.codec.allocation import BITS, FAMILIES, KINDS, Levels, Profile, kivi_codecs
from qkv_core.codec.encoding import quantizer_input, reconstructed
from qkv_core.codec.registry import KIVI, split_tools, tooled
from qkv_core.codec.tools import LLOYD_LEVELS
from qkv_core.engine.selection import keep_prefix, shared_prefix
from qkv_core.model.attention import full_attention
from qkv_core.model.kv import next_logits, prefill
from qkv_core.model.loaded import LoadedModel
from qkv_core.model.prompt import PromptFormat, encode
from qkv_core.types import KVCache


def _kl(lm: LoadedModel, kv: KVCache, query: list[int], reference: torch.Tensor) -> float:
    """KL(reference || next-token distribution after `query` over `kv`)."""
    logp = next_logits(lm, kv, query).log_softmax(-1)
    return float((reference.exp() * (reference - logp)).sum())


def _replaced(kv: KVCache, kind: str, layer: int, approx: torch.Tensor) -> KVCache:
    """`kv` with one layer's K or V replaced."""
    keys, values = list(kv.keys), list(kv.values)
    (keys if kind == "key" else values)[layer] = approx
    return KVCache(keys, values)


FIT_VALUES = 32_768  # unit values per context drawn for each layer's K or V levels


def fit_levels(lm: LoadedModel, samples: list[Sample], tools: Sequence[str], max_tokens: int = 512) -> Levels:
    """Each layer's Lloyd-Max levels for K and V at every width of the LLOYD tables, fitted on the
    samples' contexts as the KIVI codecs with `tools` code them. Keys above 1 bit keep their ends
    exact (qkv_core.codec.levels.fit); at 1 bit exact ends would be the uniform levels, and free
    ones cut SmolLM2's 1-bit K KL fourfold (6.17 -> 1.60, summed over layers)."""
    fmt = PromptFormat.for_tokenizer(lm.tokenizer)
    pooled: dict[str, list[list[torch.Tensor]]] = {kind: [[] for _ in range(lm.num_layers)] for kind in KINDS}
    g = torch.Generator().manual_seed(0)
    for context, _, _ in tqdm(samples, desc="fit levels per layer", disable=None, leave=False):
        ids = encode(lm.tokenizer, fmt.context_part(context))[:max_tokens]
        kv, _ = prefill(lm, ids)
        for kind in KINDS:
            codec = tooled(getattr(KIVI(2), kind), kind, tools)  # the layout and tools; the width is the fit's
            for layer, t in enumerate(kv.keys if kind == "key" else kv.values):
                unit = levels.unit_values(quantizer_input(t, codec, lm.fingerprint, len(ids)),
                                          per_channel=kind == "key")
                picked = torch.randint(unit.numel(), (min(unit.numel(), FIT_VALUES),), generator=g)
                pooled[kind][layer].append(unit[picked])
    return {kind: {str(bits): [list(levels.fit(torch.cat(sample), bits, exact_ends=kind == "key" and bits > 1))
                               for sample in per_layer]
                   for bits in levels.LLOYD} for kind, per_layer in pooled.items()}


def calibrate(lm: LoadedModel, samples: list[Sample], max_tokens: int = 512, tools: str = "") -> Profile:
    """Measure every candidate codec, with `tools` ("+rot+prerope", lossy ones; '' none), on every
    layer's K and V over the samples' contexts: relative reconstruction error, and (KIVI layouts)
    the KL divergence of the next-token distribution after the sample's question when only that
    tensor is quantized; and (full-attention models) that KL when one layer is dropped."""
    stem, tool_list = split_tools(tools)
    if stem:
        raise ValueError(f"calibration tools are suffixes like +rot+prerope, not {tools!r}")
    tools = "".join(tool_list)  # in the order every name's tools take (Adaptive.profile_tools)
    fitted = fit_levels(lm, samples, tool_list, max_tokens) if LLOYD_LEVELS.suffix in tool_list else {}
    fmt = PromptFormat.for_tokenizer(lm.tokenizer)
    n_layers = lm.num_layers
    droppable = full_attention(lm.model)
    sums: dict = {f: {k: {b: [[0.0, 0.0] for _ in range(n_layers)] for b in BITS} for k in KINDS} for f in FAMILIES}
    kl: dict = {k: {str(b): [0.0] * n_layers for b in BITS} for k in KINDS}
    dropped = [0.0] * n_layers if droppable else []
    tokens = 0
    for context, question, _ in tqdm(samples, desc=f"calibrate codec profile{tools}", disable=None, leave=False):
        ids = encode(lm.tokenizer, fmt.context_part(context))[:max_tokens]
        query = encode(lm.tokenizer, fmt.query_part(question))
        tokens += len(ids)
        kv, _ = prefill(lm, ids)
        reference = next_logits(lm, kv, query).log_softmax(-1)
        for family, pair in FAMILIES.items():
            for kind in KINDS:
                tensors = kv.keys if kind == "key" else kv.values
                for bits in BITS:
                    if family == "kivi":  # each layer's own levels; the per-tensor layout keeps the tables
                        codecs = kivi_codecs(kind, bits, tool_list, fitted, n_layers)
                    else:
                        codecs = [tooled(getattr(pair(bits), kind), kind, tool_list)] * n_layers
                    for layer, (t, approx) in enumerate(zip(tensors,
                                                            reconstructed(tensors, codecs, lm.fingerprint, len(ids)))):
                        acc = sums[family][kind][bits][layer]
                        acc[0] += float((approx.float() - t.float()).pow(2).sum())
                        acc[1] += float(t.float().pow(2).sum())
                        if family == "kivi":
                            replaced = _replaced(kv, kind, layer, approx)
                            kl[kind][str(bits)][layer] += _kl(lm, replaced, query, reference) / len(samples)
        if droppable:
            prefix, everything = shared_prefix(lm, ids), set(range(n_layers))
            for layer in range(n_layers):
                dropped[layer] += _kl(lm, keep_prefix(kv, everything - {layer}, prefix), query,
                                      reference) / len(samples)
    errors = {
        f: {k: {str(b): [e / n if n else 0.0 for e, n in layers] for b, layers in by_bits.items()} for k,
            by_bits in by_kind.items()}
        for f, by_kind in sums.items()
    }
    return Profile(lm.fingerprint.name, lm.fingerprint.weights_sha256, len(samples), tokens, errors, kl, tools, dropped,
                   fitted)


def load_or_calibrate(lm: LoadedModel, path: Path | None = None, tools: str = "") -> Profile:
    """The saved profile with `tools`, or one calibrated on the bundled samples (and saved) on first
    use. `path`: the plain profile's file; one with tools lies beside it (Profile.path_for)."""
    return Profile.load_or_make(lm.fingerprint, Profile.path_for(lm.fingerprint, path, tools),
                                lambda: calibrate(lm, bundled.samples(), tools=tools))
