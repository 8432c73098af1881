"""Rotary position embedding (RoPE) on cached keys: removed before coding, applied again after.

A model's cached keys carry RoPE: channel pairs (i, i + D/2) rotated by the angle p·θ_i at the
token's position p. Quantized per channel, the rotation spreads each pair's range over both
channels and every position; with RoPE removed the channels keep their own, narrower ranges
(KVQuant's pre-RoPE keys). On a 1,000-token SmolLM2 cache, 2-bit per-channel K error falls from
0.359 to 0.295 (relative Frobenius), at no cost in bytes.

Only plain RoPE is taken ("default" type, one θ base for every layer, the whole head dim rotated,
the half-split layout of Llama and most HF models): its frequencies θ_i = base^(−2i/D) follow from
the fingerprint's RoPE parameters alone, so a reader needs no model to apply them again. The
token at index j of a layer that holds the last T of a context of N tokens sits at position
N − T + j (a sliding-window layer, a delta card's tokens after its parent).
"""
from __future__ import annotations

import functools
import json

import torch

from qkv_core.errors import RequestError
from qkv_core.types import Fingerprint


@functools.lru_cache(maxsize=16)
def _inv_freq(rope: str, head_dim: int) -> torch.Tensor:
    try:
        params = json.loads(rope)
    except ValueError:
        params = None
    if not isinstance(params, dict) or params.get("rope_type", "default") != "default" or \
            not isinstance(params.get("rope_theta"), (int, float)) or set(params) - {"rope_theta", "rope_type"}:
        raise RequestError(f"pre-RoPE keys need plain RoPE (one rope_theta, default type); this model has {rope}")
    if head_dim % 2:
        raise RequestError(f"pre-RoPE keys need an even head dim, not {head_dim}")
    return 1.0 / params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def inv_freq(fp: Fingerprint) -> torch.Tensor:
    """The RoPE inverse frequencies θ_i of a model, [head_dim / 2] fp64; RequestError unless plain RoPE."""
    return _inv_freq(fp.rope, fp.head_dim)


def apply(x: torch.Tensor, inv_freq: torch.Tensor, start: int, sign: float = 1.0) -> torch.Tensor:
    """RoPE (sign +1) or its inverse (sign −1) over [heads, tokens, dim] at positions start.. (fp32)."""
    positions = torch.arange(start, start + x.shape[1], dtype=torch.float64, device=x.device)
    angles = torch.outer(positions, inv_freq.to(x.device, torch.float64)).float()
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    x = x.float()
    half = x.shape[-1] // 2
    return x * cos + sign * torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin
