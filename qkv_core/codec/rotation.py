"""Incoherence processing: a seeded, randomized Hadamard rotation over head_dim (QuaRot, QuIP#).

Before quantization every head's vectors x (head_dim D, a power of two) are rotated,

    y = (x * s_h) @ H / sqrt(D)        and after dequantization    x = (y @ H / sqrt(D)) * s_h,

H the D x D Sylvester Hadamard matrix (H[i, j] = (-1)^popcount(i & j)), s_h in {-1, +1}^D the signs
of head h. The rotation is orthogonal (it keeps norms and dot products) and spreads an outlier
channel over every channel, so a token's range shrinks and few bits lose less.

Only the seed travels (TensorCodec.rotation, 1..2^32-1; 0 is no rotation), never a matrix. The
signs are defined byte-exactly, for any implementation: for head h, the SHA-256 digests of
"qkvcomm-rotation:{seed}:{h}:{k}" for k = 0, 1, ... (ASCII, decimal) concatenated; channel c takes
bit (c % 8) of byte (c // 8), least significant bit first: 1 is -1, 0 is +1.
"""
from __future__ import annotations

import functools
import hashlib

import torch

from qkv_core.errors import RequestError


@functools.lru_cache(maxsize=64)
def signs(seed: int, heads: int, dim: int) -> torch.Tensor:
    """[heads, dim] of +-1.0 (fp32, CPU): the module docstring's definition."""
    out = torch.empty(heads, dim)
    for h in range(heads):
        stream = b"".join(hashlib.sha256(f"qkvcomm-rotation:{seed}:{h}:{k}".encode()).digest()
                          for k in range((dim + 255) // 256))
        bits = [(stream[c // 8] >> (c % 8)) & 1 for c in range(dim)]
        out[h] = torch.tensor([-1.0 if b else 1.0 for b in bits])
    return out


@functools.lru_cache(maxsize=8)
def hadamard(dim: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix scaled to be orthonormal, H / sqrt(dim) (fp32, CPU)."""
    if dim < 1 or dim & (dim - 1):
        raise RequestError(f"a rotated codec needs a power-of-two head dim, not {dim}")
    i = torch.arange(dim)
    parity = torch.zeros(dim, dim, dtype=torch.int64)
    both = i[:, None] & i[None, :]
    while both.any():
        parity ^= both & 1
        both = both >> 1
    return (1 - 2 * parity).float() / dim**0.5


@functools.lru_cache(maxsize=64)
def _matrices(seed: int, heads: int, dim: int, device: torch.device) -> torch.Tensor:
    """[heads, dim, dim]: diag(s_h) @ H / sqrt(dim), head by head; made once per device, not per tensor."""
    return (signs(seed, heads, dim)[:, :, None] * hadamard(dim)).to(device)


def rotate(x: torch.Tensor, seed: int) -> torch.Tensor:
    """[heads, tokens, dim] -> the rotated fp32 tensor."""
    heads, _, dim = x.shape
    return torch.bmm(x.float(), _matrices(seed, heads, dim, x.device))


def unrotate(y: torch.Tensor, seed: int) -> torch.Tensor:
    """The inverse of `rotate` (the matrices are orthogonal: their transposes), in fp32."""
    heads, _, dim = y.shape
    return torch.bmm(y.float(), _matrices(seed, heads, dim, y.device).transpose(1, 2))
