"""The model's attention, chosen per forward call: plain, ragged, or probed.

Every loaded model runs with the attention function registered here (`install`). Its mode
comes from keyword arguments of the one forward call that wants it (transformers passes a
model's extra keyword arguments down to every attention call), never from a process-wide
switch: concurrent generations on different caches, probes among them, share the model
without a lock (a switch held across a token stream once deadlocked the receiver when more
generations than worker threads waited on it).

- plain (no keyword): transformers' SDPA attention with the mask transformers built.
- ragged (`RAGGED=True`): layers whose cached keys differ in length (selective injection
  leaves unselected layers with only the shared chat header). The model's causal mask is
  built for layer 0's length, so each layer builds its own from its real key length: the
  chunk's Q queries are the last Q keys of every layer and every earlier key is visible (a
  causal mask aligned at the bottom right). Positions stay right because the caller passes
  `position_ids` from the full context length.
- probed (`PROBE=Probe(queries)`): attention weights are materialized (the fused kernels never
  do) and reduced on the spot to the attention each key position receives from the last
  `queries` query positions, averaged over heads and those queries (a [keys] tensor that sums
  to 1), appended per layer to the probe; memory stays one layer's attention matrix.
Ragged and probed calls assume batch 1 without padding, as every caller here is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from qkv_core.errors import Unsupported

NAME = "qkvcomm"
RAGGED = "qkvcomm_ragged"  # forward keyword: the cache is ragged
PROBE = "qkvcomm_probe"  # forward keyword: a Probe to fill


@dataclass
class Probe:
    """Per layer, the attention each key receives from the last `queries` queries of one forward."""

    queries: int
    received: list[torch.Tensor] = field(default_factory=list)


def _bottom_right_causal(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    if k_len < q_len:
        raise ValueError(f"a layer holds {k_len} keys for {q_len} queries")
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def _expand_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each KV head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return key, value


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, Q, D], key/value [B, Hkv, K, D] -> ([B, Q, H, D], None)."""
    probe: Probe | None = kwargs.pop(PROBE, None)
    ragged = kwargs.pop(RAGGED, False)
    if probe is None and not ragged:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    mask = _bottom_right_causal(query.shape[-2], key.shape[-2], query.device)
    key, value = _expand_kv(query, key, value)
    if probe is None:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    weights = ((query @ key.transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf")).softmax(-1)
    probe.received.append(weights[0, :, -probe.queries :].float().mean(dim=(0, 1)))
    return (weights.to(value.dtype) @ value).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # plain calls get SDPA's mask; the other modes build their own


def install(model: PreTrainedModel) -> None:
    """Make `model` attend through `attention` (once, at load)."""
    model.set_attn_implementation(NAME)


def mode(ragged: bool = False, probe: Probe | None = None) -> dict:
    """The forward keywords of one call's attention mode."""
    return {**({RAGGED: True} if ragged else {}), **({PROBE: probe} if probe is not None else {})}


def full_attention(model: PreTrainedModel) -> bool:
    """Whether every layer of the model attends to its whole cache (no sliding window: its layers
    keep their own windows, which a per-layer prefix cut would corrupt)."""
    types = getattr(model.config, "layer_types", None) or []
    return not getattr(model.config, "sliding_window", None) and all(t == "full_attention" for t in types)


def require_full_attention(model: PreTrainedModel, name: str) -> None:
    """ValueError unless the model has full attention in every layer (full_attention)."""
    if not full_attention(model):
        raise Unsupported(f"{name} has sliding-window layers; selective injection supports full attention only")
