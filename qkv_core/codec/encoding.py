"""Encoding a KV cache's tensors with their codecs: the layer blobs a card carries.

A layer blob is the encoded K then the encoded V (byte layout: qkv_core.codec.quant). Tensors
that share a codec and shape go through one batched quantize call. With token-level mixed
precision the salient context positions are mapped into each layer's quantized middle. Pre-RoPE
keys are coded with RoPE removed at their positions in the context (qkv_core.codec.rope).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from qkv_core.codec import rope, tools
from qkv_core.codec.quant import dequantize, fp16_windows, quantize_many
from qkv_core.codec.registry import LayerCodec
from qkv_core.codec.tensor_codec import TensorCodec
from qkv_core.types import Fingerprint, KVCache


def layer_salient(positions: Sequence[int], context_tokens: int, layer_tokens: int,
                  codec: TensorCodec) -> torch.Tensor | None:
    """The salient context positions as indices into one layer's quantized middle (a layer
    holds the last `layer_tokens` tokens of the context); None when the codec has none."""
    if not codec.salient_bits or not positions:
        return None
    sink, recent = fp16_windows(codec, layer_tokens)
    lo = context_tokens - layer_tokens + sink
    hi = context_tokens - recent
    return torch.tensor([p - lo for p in positions if lo <= p < hi], dtype=torch.long)


def salient_count(positions: Sequence[int], context_tokens: int, layer_tokens: int, codec: TensorCodec) -> int:
    idx = layer_salient(positions, context_tokens, layer_tokens, codec)
    return 0 if idx is None else idx.numel()


def encode_tensors(
    tensors: list[torch.Tensor], codecs: list[TensorCodec], salient: Sequence[int] = (), context_tokens: int = 0
) -> list[torch.Tensor]:
    """Each tensor encoded with its codec; tensors sharing a codec and shape go through one
    batched quantize call."""
    batches: dict[tuple, list[int]] = defaultdict(list)
    for i, (t, c) in enumerate(zip(tensors, codecs)):
        batches[c, tuple(t.shape)].append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
    for (c, shape), members in batches.items():
        idx = layer_salient(salient, context_tokens, shape[1], c)
        for i, blob in zip(members, quantize_many([tensors[i] for i in members], c, idx)):
            out[i] = blob
    return out


def encode_layers(
    kv: KVCache, layers: Sequence[LayerCodec], sent: Sequence[int], salient: Sequence[int] = (),
    fp: Fingerprint | None = None, context_tokens: int | None = None,
) -> list[tuple[bytes, bytes]]:
    """Each sent layer's encoded (K, V) (`layers`: one codec per model layer); a layer's blob on the
    wire is K then V. Pre-RoPE keys need the model (`fp`) and the context length the cache ends
    at (`context_tokens`, default kv.tokens; a delta's cache begins after its parent's tokens)."""
    context_tokens = kv.tokens if context_tokens is None else context_tokens
    keys = [rope_removed(kv.keys[i], layers[i].key, fp, context_tokens) for i in sent]
    keys = encode_tensors(keys, [layers[i].key for i in sent], salient, kv.tokens)
    values = encode_tensors([kv.values[i] for i in sent], [layers[i].value for i in sent], salient, kv.tokens)
    return [(k.cpu().numpy().tobytes(), v.cpu().numpy().tobytes()) for k, v in zip(keys, values)]


def rope_removed(key: torch.Tensor, codec: TensorCodec, fp: Fingerprint | None, context_tokens: int) -> torch.Tensor:
    """A layer's K as its codec codes it: with RoPE removed when the codec says pre_rope (the layer
    holds the last key.shape[1] tokens of `context_tokens`)."""
    if not codec.pre_rope:
        return key
    if fp is None:
        raise ValueError("pre-RoPE keys need the model's fingerprint")
    return rope.apply(key, rope.inv_freq(fp), context_tokens - key.shape[1], -1.0)


def rope_restored(key: torch.Tensor, codec: TensorCodec, fp: Fingerprint | None, context_tokens: int) -> torch.Tensor:
    """Inverse of rope_removed on a decoded K (same dtype as given)."""
    if not codec.pre_rope:
        return key
    if fp is None:
        raise ValueError("pre-RoPE keys need the model's fingerprint")
    return rope.apply(key, rope.inv_freq(fp), context_tokens - key.shape[1]).to(key.dtype)


def quantizer_input(tensor: torch.Tensor, codec: TensorCodec, fp: Fingerprint | None,
                    context_tokens: int) -> torch.Tensor:
    """A K or V tensor as `codec`'s quantizer sees it: RoPE removed (pre-RoPE keys), then rotated."""
    x = rope_removed(tensor, codec, fp, context_tokens)
    return tools.before_quantizing(x, codec)


def reconstructed(tensors: list[torch.Tensor], codecs: Sequence[TensorCodec], fp: Fingerprint | None,
                  context_tokens: int) -> list[torch.Tensor]:
    """Each K (or V) tensor as a receiver gets it back from its codec: coded (pre-RoPE keys with
    RoPE removed at their positions), decoded, RoPE restored."""
    blobs = encode_tensors([rope_removed(t, c, fp, context_tokens) for t, c in zip(tensors, codecs)], list(codecs))
    return [rope_restored(dequantize(b, c, (t.shape[0], t.shape[1], t.shape[2]), t.dtype), c, fp, context_tokens)
            for b, c, t in zip(blobs, codecs, tensors)]
