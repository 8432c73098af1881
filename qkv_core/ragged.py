"""Attention over a ragged cache: layers whose cached keys differ in length.

Selective injection leaves unselected layers with only the shared prompt prefix while the
selected ones hold the whole context. The model's own causal mask is built for one length
(layer 0's), so it is wrong for every other layer. This attention function, registered with
transformers' `AttentionInterface`, builds each layer's mask from that layer's real key
length: the current chunk's Q queries are the last Q keys of every layer, and every earlier
key is visible (a causal mask aligned at the bottom right). Positions stay right because the
caller passes `position_ids` from the full context length (RoPE was applied to the cached
keys at their own positions when they were computed).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .models import LoadedModel

NAME = "qkvcomm_ragged"
_LOCK = threading.Lock()  # the switch is the model's, not one request's


def ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, Q, D], key/value [B, Hkv, K, D] -> ([B, Q, H, D], None)."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    if k_len < q_len:
        raise ValueError(f"a layer holds {k_len} keys for {q_len} queries")
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(diagonal=k_len - q_len)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each KV head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, ragged_attention)
AttentionMaskInterface.register(NAME, lambda *args, **kwargs: None)  # masks are built per layer above


def check(lm: LoadedModel) -> None:
    """ValueError unless every layer of the model attends to its whole cache (no sliding window:
    its layers keep their own windows, which a per-layer prefix cut would corrupt)."""
    types = getattr(lm.model.config, "layer_types", None) or []
    if getattr(lm.model.config, "sliding_window", None) or any(t != "full_attention" for t in types):
        raise ValueError(f"{lm.fingerprint.name} has sliding-window layers; selective injection supports full attention only")


@contextmanager
def ragged(lm: LoadedModel, active: bool) -> Iterator[None]:
    """Within the block the model attends with per-layer masks (when `active`)."""
    if not active:
        yield
        return
    check(lm)
    with _LOCK:
        previous = lm.model.config._attn_implementation
        lm.model.set_attn_implementation(NAME)
        try:
            yield
        finally:
            lm.model.set_attn_implementation(previous)
