"""Dense little-endian bit packing of integer codes, any width from 1 to 8 bits.

Codes are packed LSB-first into a little-endian bit stream: code i occupies bits
[i*b, (i+1)*b). So 4-bit codes pack two per byte (low nibble first), 6-bit codes four
per three bytes, 3-bit codes eight per three bytes. Work happens in word groups of
g = 8 / gcd(8, b) codes (exactly g*b/8 bytes): g one-byte codes viewed as one g-byte
integer are squeezed together by shifting byte i down by i*(8-b) bits. Every op is a
contiguous vectorized pass on whatever device holds the codes; no per-element loop.
"""
from __future__ import annotations

import math
import sys

import torch

if sys.byteorder != "little":  # the byte views below assume it
    raise ImportError("qkv_core.packing requires a little-endian host")

_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def packed_size(n: int, bits: int) -> int:
    """Bytes taken by n codes of the given width."""
    return (n * bits + 7) // 8


def _layout(bits: int) -> tuple[int, int]:
    """(codes per word group, bytes per group)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bit width must be within 1..8, got {bits}")
    group = 8 // math.gcd(8, bits)
    return group, group * bits // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat uint8 tensor of codes (each < 2**bits) into packed_size(n, bits) bytes."""
    group, nbytes = _layout(bits)
    codes = codes.reshape(-1)
    n = codes.numel()
    if bits == 8:
        return codes.to(torch.uint8)
    if n % group:
        codes = torch.cat([codes, codes.new_zeros(group - n % group)])
    words = codes.contiguous().view(_WORD[group])
    mask = (1 << bits) - 1
    # Bytes above the lowest hold codes < 2**7, so the signed words never shift in ones.
    out = words & mask
    for i in range(1, group):
        out |= (words >> (i * (8 - bits))) & (mask << (i * bits))
    packed = out.view(torch.uint8).view(-1, group)[:, :nbytes].reshape(-1)
    return packed[: packed_size(n, bits)]


def unpack_bits(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of pack_bits: the first n codes, as a flat uint8 tensor."""
    group, nbytes = _layout(bits)
    packed = packed.reshape(-1)
    if packed.numel() != packed_size(n, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {n} codes of {bits} bits")
    if bits == 8:
        return packed.to(torch.uint8)
    groups = -(-n // group)
    words = torch.zeros(groups, group, dtype=torch.uint8, device=packed.device)
    flat = torch.zeros(groups * nbytes, dtype=torch.uint8, device=packed.device)
    flat[: packed.numel()] = packed
    words[:, :nbytes] = flat.view(groups, nbytes)
    words = words.view(_WORD[group]).view(-1)
    mask = (1 << bits) - 1
    out = words & mask
    for i in range(1, group):
        out |= ((words >> (i * bits)) & mask) << (8 * i)
    return out.view(torch.uint8)[:n]
