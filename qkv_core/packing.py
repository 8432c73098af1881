"""Dense little-endian bit packing of integer codes, any width from 1 to 8 bits.

Codes are packed LSB-first into a little-endian bit stream: code i occupies bits
[i*b, (i+1)*b). So 4-bit codes pack two per byte (low nibble first), 6-bit codes four
per three bytes, 3-bit codes eight per three bytes. Work happens in word groups of
g = 8 / gcd(8, b) codes (exactly g*b/8 bytes), each built with g vectorized shifts in
the narrowest integer type that holds it, on whatever device holds the codes.
"""
from __future__ import annotations

import math
import sys

import torch

if sys.byteorder != "little":  # the byte views below assume it
    raise ImportError("qkv_core.packing requires a little-endian host")


def packed_size(n: int, bits: int) -> int:
    """Bytes taken by n codes of the given width."""
    return (n * bits + 7) // 8


def _layout(bits: int) -> tuple[int, int, torch.dtype]:
    """(codes per word group, bytes per group, integer type that holds a group)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bit width must be within 1..8, got {bits}")
    group = 8 // math.gcd(8, bits)
    nbytes = group * bits // 8
    dtype = torch.uint8 if nbytes == 1 else torch.int32 if nbytes <= 4 else torch.int64
    return group, nbytes, dtype


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat uint8 tensor of codes (each < 2**bits) into packed_size(n, bits) bytes."""
    group, nbytes, dtype = _layout(bits)
    codes = codes.reshape(-1)
    n = codes.numel()
    if bits == 8:
        return codes.to(torch.uint8)
    pad = (-n) % group
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    cols = codes.view(-1, group)
    word = torch.empty(cols.shape[0], dtype=dtype, device=cols.device).copy_(cols[:, 0])
    for i in range(1, group):
        word |= cols[:, i].to(dtype) << (i * bits)
    packed = word.view(torch.uint8).view(-1, word.element_size())[:, :nbytes].reshape(-1)
    return packed[: packed_size(n, bits)]


def unpack_bits(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of pack_bits: the first n codes, as a flat uint8 tensor."""
    group, nbytes, dtype = _layout(bits)
    packed = packed.reshape(-1)
    if packed.numel() != packed_size(n, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {n} codes of {bits} bits")
    if bits == 8:
        return packed.to(torch.uint8)
    groups = -(-n // group)
    full = packed.new_zeros(groups * nbytes)
    full[: packed.numel()] = packed
    words = torch.zeros(groups, torch.empty((), dtype=dtype).element_size(), dtype=torch.uint8, device=packed.device)
    words[:, :nbytes] = full.view(groups, nbytes)
    word = words.view(dtype).view(-1)
    mask = (1 << bits) - 1
    cols = torch.stack([(word >> (i * bits)) & mask for i in range(group)], dim=1)
    return cols.reshape(-1)[:n].to(torch.uint8)
