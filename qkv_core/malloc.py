"""Keep glibc malloc from handing large tensor buffers back to the kernel after every op.

By default glibc serves blocks above a (dynamic) threshold with mmap and returns freed
heap tops with trim; for the tens-of-megabytes tensors of a KV cache that turns every
quantize into page faults and unmaps (measured: an fp32 multiply-add over 5.9M values
took 8.8 ms instead of 1.8 ms). Raising both thresholds keeps the memory for reuse, as
PyTorch's CPU performance guide achieves by swapping in jemalloc or tcmalloc.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit hosts
_TRIM_THRESHOLD = 1 << 30


def _libc_function(name: str):  # noqa: ANN202 - a ctypes function, or None off glibc
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):
        return None


def tune() -> bool:
    """Apply the thresholds in this process; False where the C library is not glibc."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def trim() -> bool:
    """Hand freed heap memory back to the kernel now (glibc malloc_trim). The raised trim threshold
    keeps up to 1 GiB for reuse, which is right for the next card but makes RSS ratchet up when
    cards are refused midway; the receiver trims after a failed intake (at most every few seconds)."""
    malloc_trim = _libc_function("malloc_trim")
    return bool(malloc_trim(0)) if malloc_trim is not None else False
