"""Asymmetric min/max quantization of one KV tensor, and its byte layout on the wire.

A tensor is [heads, tokens, head_dim]. Optional fp16 windows keep the first `sink_tokens`
and the last `recent_tokens` tokens exact; the tokens between them are quantized. The
quantized part is viewed as rows of a 2-D matrix whose rows share one (scale, zero):

    per-tensor   1 row                  of H*T*D values
    per-token    H*T rows (head, token) of D values
    per-channel  H*D rows (head, chan)  of T values
    per-group    H*T*D/G rows           of G consecutive channels of one token

Encoded blob, all little-endian: packed codes in the tensor's own [heads, tokens, dim]
order, fp16 scales and fp16 zero points (row-major in the order of the rows above), then
the fp16 sink window and the fp16 recent window. With token-level mixed precision
(salient_bits, and a set of salient tokens known to both sides) the middle is two such
parts: the ordinary tokens at `bits`, then the salient tokens at `salient_bits`. With
bits=16 the blob is the fp16 tensor itself, with bits=32 the fp32 tensor (lossless).
Zero points are rounded down and scales up to fp16 before the codes are computed, so |x - x_hat| <= scale/2 holds for
the stored (fp16) scale, and a
constant row stores scale 0 and dequantizes to its zero point exactly (never 0/0) (compact side
information below rounds onto its grids the same way).
With `outliers` (dense-and-sparse) a quantized part's k = values * outliers // 10,000 values that lie
farthest from their row's mean, in row standard deviations, travel exactly after its zero points:
k int32 indices (ascending, into the part in [heads, tokens, dim] order), then k fp16 values; the
rows' ranges leave them out, and their codes are clamped and never read.
With `levels` (non-uniform levels, qkv_core.codec.levels) a code c stands for zero + scale *
qmax * levels[c] instead of zero + scale * c, and a value takes the nearest level's code; the
layout is unchanged. With `rotation` (a seed) the tensor is rotated over head_dim first (qkv_core.codec.rotation) and
everything above applies to the rotated tensor; decoding rotates back. The layout is unchanged.
With `side_bits` = 8 (compact side information) a part's scales and zero points travel as one
byte each on grids of its own instead of fp16: four fp16 values, the zero grid's base and step and
the scale grid's top and span (in octaves), then a uint8 scale code per row, then a uint8 zero code
per row. Zero code z stands for base + step * z (rounded down onto the grid, so zero <= every
value of its row), scale code q for top * 2^((q - 255) * span / 255) (rounded up, so the codes
still cover the row): log-spaced, so every scale keeps the same relative precision. Half the side
bytes (2 per row, not 4), for steps at most 2^(span/255) wider. The rest of the layout is unchanged.
With `entropy` the codes are laid out in row order at an aligned width and the whole blob travels
as one zstd frame (qkv_core.codec.entropy); `encoded_size` is then the frame's content size, and
the bytes on the wire are known only once the tensor is encoded.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from qkv_core.codec import entropy, kernels, levels, tools
from qkv_core.codec.packing import pack_bits, packed_size, unpack_bits
from qkv_core.codec.tensor_codec import (
    FLOAT_DTYPES,
    FP16_BITS,
    OUTLIER_SCALE,
    Granularity,
    TensorCodec,
)
from qkv_core.errors import RequestError

# 4 MiB of fp32 staging: stays in L3 across the passes, above per-op overhead (best of 2^17..2^22 on a 2-core EPYC)
_BATCH_ELEMENTS = 1 << 20
_SIDE_TOP = 255  # the largest compact scale or zero code
_SIDE_HEADER = 4  # fp16 values before a compact part's codes: zero base, zero step, scale top, scale span


def fp16_windows(codec: TensorCodec, tokens: int) -> tuple[int, int]:
    """(sink, recent) fp16 window lengths for a tensor of `tokens` tokens; together <= tokens."""
    sink = min(codec.sink_tokens, tokens)
    return sink, min(codec.recent_tokens, tokens - sink)


def _rows(codec: TensorCodec, heads: int, tokens: int, dim: int) -> tuple[int, int]:
    """(number of rows, values per row) of the quantized part."""
    if codec.granularity == Granularity.PER_TENSOR:
        return (1, heads * tokens * dim) if tokens else (0, 0)
    if codec.granularity == Granularity.PER_TOKEN:
        return heads * tokens, dim
    if codec.granularity == Granularity.PER_CHANNEL:
        return (heads * dim, tokens) if tokens else (0, 0)
    if dim % codec.group_size:
        raise RequestError(f"group size {codec.group_size} does not divide head dim {dim}")
    return heads * tokens * dim // codec.group_size, codec.group_size


def _group_shapes(codec: TensorCodec, tensors: int, heads: int, tokens: int, dim: int) -> tuple[tuple[int, ...], int]:
    """(a view of `tensors` stacked tensors in which each (scale, zero) group spans one dim, that dim).

    A view, never a copy: codes keep the tensors' own order and the stats broadcast."""
    if codec.granularity == Granularity.PER_TENSOR:
        return (tensors, heads * tokens * dim), 1
    if codec.granularity == Granularity.PER_TOKEN:
        return (tensors * heads, tokens, dim), 2
    if codec.granularity == Granularity.PER_CHANNEL:
        return (tensors * heads, tokens, dim), 1
    return (tensors * heads, tokens, dim // codec.group_size, codec.group_size), 3


def _parts(codec: TensorCodec, middle: int, salient: int) -> list[tuple[int, int]]:
    """(bits, tokens) of each quantized part: the whole middle, or its ordinary tokens then
    its salient ones."""
    if not 0 <= salient <= middle:
        raise RequestError(f"{salient} salient tokens do not fit {middle} quantized tokens")
    if codec.salient_bits and salient:
        return [(codec.bits, middle - salient), (codec.salient_bits, salient)]
    return [(codec.bits, middle)]


def _code_width(codec: TensorCodec, bits: int) -> int:
    """The width codes are packed at: their own, or aligned for the entropy coder."""
    return entropy.aligned_width(bits) if codec.entropy else bits


def _row_order(codec: TensorCodec) -> bool:
    """Whether codes are laid out in row order rather than the tensor's: entropy-coded
    per-channel codes run along the tokens of one channel (the other granularities' rows
    already follow the tensor's order)."""
    return bool(codec.entropy) and codec.granularity == Granularity.PER_CHANNEL


def outlier_count(codec: TensorCodec, values: int) -> int:
    """How many of a part's `values` quantized values travel exactly."""
    return values * codec.outliers // OUTLIER_SCALE


def _side_size(codec: TensorCodec, rows: int) -> int:
    """Bytes of a part's scales and zero points."""
    return 2 * _SIDE_HEADER + 2 * rows if codec.side_bits else 4 * rows


def _part_size(codec: TensorCodec, bits: int, heads: int, tokens: int, dim: int) -> int:
    rows, width = _rows(codec, heads, tokens, dim)
    return (packed_size(rows * width, _code_width(codec, bits)) + _side_size(codec, rows)
            + 6 * outlier_count(codec, rows * width))


def encoded_size(codec: TensorCodec, heads: int, tokens: int, dim: int, salient: int = 0) -> int:
    """Exact byte size of the encoded tensor, scales, zero points and windows included (with
    entropy coding: before it, the size of the frame's content)."""
    if codec.is_float:
        return codec.bits // 8 * heads * tokens * dim
    sink, recent = fp16_windows(codec, tokens)
    parts = _parts(codec, tokens - sink - recent, salient)
    return sum(_part_size(codec, b, heads, t, dim) for b, t in parts) + 2 * heads * (sink + recent) * dim


def wire_size_fits(codec: TensorCodec, nbytes: int, heads: int, tokens: int, dim: int, salient: int = 0) -> bool:
    """Whether a tensor can take `nbytes` on the wire: exactly its encoded_size, or with entropy
    coding one frame no larger than zstd's bound on it."""
    size = encoded_size(codec, heads, tokens, dim, salient)
    return 0 < nbytes <= entropy.bound(size) if codec.entropy else nbytes == size


def _round_fp16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """x rounded to fp16 toward +inf (up) or -inf, so the stored value bounds x."""
    h = x.to(torch.float16)
    limit = torch.tensor(float("inf") if up else float("-inf"), dtype=h.dtype, device=h.device)
    wrong = h.float() < x if up else h.float() > x
    return torch.where(wrong, torch.nextafter(h, limit), h)


def _float_bytes(x: torch.Tensor, bits: int = FP16_BITS) -> torch.Tensor:
    h = x.to(FLOAT_DTYPES[bits])
    # One reduction (NaN and inf propagate through max): 10x faster than isfinite().all() on fp16.
    if h.numel() and not torch.isfinite(h.abs().amax()):
        raise ValueError(f"KV values are not finite in fp{bits} (NaN, inf or out of range)")
    return h.contiguous().view(torch.uint8).reshape(-1)


def quantize(x: torch.Tensor, codec: TensorCodec, salient: torch.Tensor | None = None) -> torch.Tensor:
    """Encode a [heads, tokens, dim] tensor into a flat uint8 blob on x's device."""
    return quantize_many([x], codec, salient)[0]


def quantize_many(
    xs: Sequence[torch.Tensor], codec: TensorCodec, salient: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Encode tensors of one shape with one codec: each blob equals quantize(x, codec).

    `salient` (ascending indices into the quantized middle) picks the tokens coded at
    codec.salient_bits; they form their own part after the ordinary tokens."""
    # on CUDA, one fused pass per tensor where the kernels cover the codec
    if salient is None and kernels.handles(codec, xs[0].shape, xs[0].dtype, xs[0].device):
        blobs = [kernels.encode(x, codec) for x in xs]
    else:
        blobs = _plain_blobs(xs, codec, salient)
    return [tools.after_encoding(b, codec) for b in blobs]


def _plain_blobs(xs: Sequence[torch.Tensor], codec: TensorCodec, salient: torch.Tensor | None) -> list[torch.Tensor]:
    """quantize_many before entropy coding."""
    shape = xs[0].shape
    if len(shape) != 3 or any(x.shape != shape for x in xs):
        raise ValueError(f"expected [heads, tokens, dim] tensors of one shape, got {[tuple(x.shape) for x in xs]}")
    xs = [tools.before_quantizing(x, codec) for x in xs]
    if codec.is_float:
        return [_float_bytes(x, codec.bits) for x in xs]
    heads, tokens, dim = shape
    sink, recent = fp16_windows(codec, tokens)
    middles = [x[:, sink : tokens - recent] for x in xs]
    count = 0 if salient is None else salient.numel()
    salient = None if salient is None else salient.to(xs[0].device)  # positions may come from the CPU
    parts = _parts(codec, tokens - sink - recent, count)
    if len(parts) == 1:
        subsets = [middles]
    else:
        assert salient is not None  # a second part is the salient tokens'
        ordinary = torch.ones(tokens - sink - recent, dtype=torch.bool, device=xs[0].device)
        ordinary[salient] = False
        keep = ordinary.nonzero().squeeze(1)
        subsets = [[m.index_select(1, keep) for m in middles], [m.index_select(1, salient) for m in middles]]
    encoded = [_encode_part(ms, codec, bits) for (bits, _), ms in zip(parts, subsets)]
    if sink + recent:
        encoded.append([torch.cat([_float_bytes(x[:, :sink]), _float_bytes(x[:, tokens - recent :])]) for x in xs])
    return [torch.cat(pieces) if len(pieces) > 1 else pieces[0] for pieces in zip(*encoded)]


def _encode_part(xs: list[torch.Tensor], codec: TensorCodec, bits: int) -> list[torch.Tensor]:
    """Codes, scales and zeros of each tensor, in batches of up to _BATCH_ELEMENTS values:
    on a CPU the per-op overhead of 60 small per-layer calls costs more than the
    arithmetic, and buffers above glibc's 32 MiB mmap ceiling are mapped and unmapped on
    every op (an elementwise op over 11.8M values took 25 ms in one batch, 1-2 ms in three)."""
    if not xs[0].numel():
        return [xs[0].new_empty(0, dtype=torch.uint8)] * len(xs)
    per_batch = min(len(xs), max(1, _BATCH_ELEMENTS // xs[0].numel()))
    # One fp32 staging buffer for every batch: the codes are computed in it, in place.
    staging = torch.empty((per_batch, *xs[0].shape), dtype=torch.float32, device=xs[0].device)
    return [blob for i in range(0, len(xs), per_batch)
            for blob in _encode_batch(xs[i : i + per_batch], codec, bits, staging)]


def _encode_batch(xs: list[torch.Tensor], codec: TensorCodec, bits: int, staging: torch.Tensor) -> list[torch.Tensor]:
    n = len(xs)
    heads, tokens, dim = xs[0].shape
    rows, width = _rows(codec, heads, tokens, dim)  # validates the group size
    staged = staging[:n]
    for out, x in zip(staged, xs):
        out.copy_(x)  # one converting copy; the inputs stay intact
    view, dim_reduced = _group_shapes(codec, n, heads, tokens, dim)
    groups = staged.view(view)
    qmax = (1 << bits) - 1
    sparse, low, high = _outliers(groups, dim_reduced, n, outlier_count(codec, rows * width))
    zero, s, side = (_compact_side if codec.side_bits else _fp16_side)(low.view(n, rows), high.view(n, rows), qmax)
    stats = low.shape
    zero, s = zero.view(stats), s.view(stats)
    inv = torch.where(s > 0, s.reciprocal(), 0.0)
    # code = floor((x - zero) / scale + 1/2) = floor((x - (zero - scale/2)) * (1/scale)), in
    # place on the staging buffer. No clamp is needed: zero <= x makes the difference >= 0, and
    # x <= zero + qmax * scale bounds the product by qmax + 1/2 plus a few fp32 ulps.
    # Codes below 128 go through int8: float->int8 is vectorized on the CPU, float->uint8
    # is not (0.75 vs 0.14 ms for 2M values).
    if codec.levels:  # the nearest of the non-uniform levels, from the value in code units
        codes = levels.nearest(groups.sub_(zero).mul_(inv),
                               levels.code_units(codec.levels, groups.device)).to(torch.uint8)
    else:
        units = groups.sub_(zero - s / 2).mul_(inv)
        if sparse:  # outliers lie outside their row's range: their codes are clamped (and never read)
            units.clamp_(0, qmax)
        codes = units.to(torch.int8 if bits < 8 else torch.uint8).view(torch.uint8)
    if _row_order(codec):
        codes = codes.view(n * heads, tokens, dim).transpose(1, 2).contiguous()
    code_width = _code_width(codec, bits)
    if rows * width * code_width % 8 == 0:  # every tensor starts on a byte: pack and join all at once
        return list(torch.cat([pack_bits(codes, code_width).view(n, -1), side, *sparse], dim=1))
    packed = [pack_bits(c, code_width) for c in codes.view(n, -1)]
    return [torch.cat(parts) for parts in zip(packed, side, *sparse)]


# (zero points, scales) in fp32 as decoded, [tensors, rows]; the bytes
_Side = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _fp16_side(low: torch.Tensor, high: torch.Tensor, qmax: int) -> _Side:
    """Each row's fp16 zero point (rounded down) and scale (rounded up); bytes: scales, then zeros."""
    zero = _round_fp16(low, up=False)
    scale = _round_fp16((high - zero.float()) / qmax, up=True)
    if not torch.isfinite(scale).all():  # NaN or inf in a group, or a range beyond fp16
        raise ValueError("KV values are not finite, or their range exceeds fp16; use a finer granularity or fp16")
    return zero.float(), scale.float(), torch.cat([scale.view(torch.uint8), zero.view(torch.uint8)], dim=1)


def _compact_side(low: torch.Tensor, high: torch.Tensor, qmax: int) -> _Side:
    """Each row's zero point and scale on its tensor's two 8-bit grids (module docstring); bytes:
    the grids' four fp16 values, the scale codes, the zero codes."""
    base = _round_fp16(low.amin(dim=1, keepdim=True), up=False)
    step = _round_fp16((low.amax(dim=1, keepdim=True) - base.float()) / _SIDE_TOP, up=True)
    zq = ((low - base.float()) / step.float()).nan_to_num_(0.0).floor_().clamp_(0, _SIDE_TOP)  # 0/0: one zero for all
    zero = _zeros(base, step, zq)
    zq = torch.where(zero > low, (zq - 1).clamp_(min=0), zq)  # fp32 rounding may land a step above the row
    zero = _zeros(base, step, zq)
    need = (high - zero) / qmax
    top = _round_fp16(need.amax(dim=1, keepdim=True), up=True)
    if not torch.isfinite(top).all():
        raise ValueError("KV values are not finite, or their range exceeds fp16; use a finer granularity or fp16")
    smallest = torch.where(need > 0, need, top.float()).amin(dim=1, keepdim=True)
    # octaves from the smallest scale to top
    span = _round_fp16(torch.log2(top.float() / smallest).nan_to_num_(0.0), up=True)
    position = _SIDE_TOP + _SIDE_TOP * torch.log2(need / top.float()) / span.float()
    sq = torch.where(span > 0, position, float(_SIDE_TOP)).nan_to_num_(0.0).ceil_().clamp_(0, _SIDE_TOP)
    scale = _scales(top, span, sq)
    sq = torch.where(scale < need, (sq + 1).clamp_(max=_SIDE_TOP), sq)  # as for the zeros; top covers every row
    scale = _scales(top, span, sq)
    grids = torch.cat([base, step, top, span], dim=1).view(torch.uint8)
    return zero, scale, torch.cat([grids, sq.to(torch.uint8), zq.to(torch.uint8)], dim=1)


def _zeros(base: torch.Tensor, step: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Compact zero points from their grid (fp16 base and step) and codes; encoder and decoder share it."""
    return base.float() + step.float() * codes.float()


def _scales(top: torch.Tensor, span: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Compact scales from their grid (fp16 top and span in octaves) and codes; encoder and decoder share it."""
    return top.float() * torch.exp2((codes.float() - _SIDE_TOP) * span.float() / _SIDE_TOP)


def _outliers(groups: torch.Tensor, reduced: int, tensors: int,
              k: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(the outlier bytes of each tensor, [k int32 indices ascending] and [k fp16 values], as uint8
    rows, or none; every row's min and max without them). `groups`: the staged tensors in their
    group view, `reduced` the dim a row spans."""
    if not k:
        return [], groups.amin(dim=reduced, keepdim=True), groups.amax(dim=reduced, keepdim=True)
    spread = groups.std(dim=reduced, keepdim=True, correction=0).clamp_min(torch.finfo(torch.float32).tiny)
    deviation = (groups - groups.mean(dim=reduced, keepdim=True)).abs_().div_(spread)
    index = deviation.view(tensors, -1).topk(k, dim=1).indices.sort(dim=1).values
    mask = torch.zeros_like(deviation, dtype=torch.bool)
    mask.view(tensors, -1).scatter_(1, index, True)
    inner_low = torch.where(mask, torch.inf, groups).amin(dim=reduced, keepdim=True)
    inner_high = torch.where(mask, -torch.inf, groups).amax(dim=reduced, keepdim=True)
    values = _float_bytes(groups.reshape(tensors, -1).gather(1, index)).view(tensors, -1)
    sparse = [index.to(torch.int32).view(torch.uint8), values]
    if torch.isfinite(inner_low).all():
        return sparse, inner_low, inner_high
    kept = torch.isfinite(inner_low)  # a row that is all outliers keeps its full range
    return (sparse, torch.where(kept, inner_low, groups.amin(dim=reduced, keepdim=True)),
            torch.where(kept, inner_high, groups.amax(dim=reduced, keepdim=True)))


def dequantize(
    blob: torch.Tensor,
    codec: TensorCodec,
    shape: tuple[int, int, int],
    dtype: torch.dtype,
    salient: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode a blob made by `quantize` (with the same `salient`) into a [heads, tokens, dim] tensor."""
    heads, tokens, dim = shape
    blob = blob.reshape(-1)
    count = 0 if salient is None else salient.numel()
    salient = None if salient is None else salient.to(blob.device)
    size = encoded_size(codec, heads, tokens, dim, count)
    blob = tools.before_decoding(blob, codec, size)
    if blob.numel() != size:
        raise ValueError(f"blob of {blob.numel()} bytes does not match {codec} for shape {tuple(shape)}")
    if salient is None and kernels.handles(codec, shape, dtype, blob.device):
        return kernels.decode(blob, codec, torch.empty(shape, dtype=dtype, device=blob.device))

    def take(n: int, dtype: torch.dtype) -> torch.Tensor:
        nonlocal blob
        width = dtype.itemsize
        out, blob = blob[: n * width].contiguous(), blob[n * width :]
        if out.storage_offset() % width:  # packed codes of odd length: realign before viewing
            out = out.clone()
        return out.view(dtype)

    def take_float(n: int, bits: int = FP16_BITS) -> torch.Tensor:
        return take(n, FLOAT_DTYPES[bits])

    if codec.is_float:
        return tools.after_dequantizing(take_float(heads * tokens * dim, codec.bits).reshape(shape), codec).to(dtype)
    sink, recent = fp16_windows(codec, tokens)
    middle = tokens - sink - recent
    decoded = []
    for bits, part_tokens in _parts(codec, middle, count):
        if not part_tokens:
            decoded.append(torch.empty(heads, 0, dim, device=blob.device))
            continue
        rows, width = _rows(codec, heads, part_tokens, dim)
        code_width = _code_width(codec, bits)
        nbytes = packed_size(rows * width, code_width)
        codes, blob = unpack_bits(blob[:nbytes], rows * width, code_width), blob[nbytes:]
        if _row_order(codec):
            codes = codes.view(heads, dim, part_tokens).transpose(1, 2).contiguous()
        if codec.side_bits:
            base, step, top, span = take_float(_SIDE_HEADER).view(_SIDE_HEADER, 1)
            scale, zero = _scales(top, span, take(rows, torch.uint8)), _zeros(base, step, take(rows, torch.uint8))
        else:
            scale, zero = take_float(rows).float(), take_float(rows).float()
        view, reduced = _group_shapes(codec, 1, heads, part_tokens, dim)
        stats = [1 if i == reduced else n for i, n in enumerate(view)]
        units = levels.code_units(codec.levels, codes.device)[codes.long()] if codec.levels else codes.float()
        part = units.view(view).mul_(scale.view(stats)).add_(zero.view(stats)).view(heads, part_tokens, dim)
        if k := outlier_count(codec, rows * width):
            index, exact = take(k, torch.int32).long(), take_float(k).float()
            if not ((index[1:] > index[:-1]).all() and 0 <= index[0] and index[-1] < rows * width):
                raise ValueError("outlier indices are not ascending within the tensor")
            part.view(-1).scatter_(0, index, exact)
        decoded.append(part)
    if len(decoded) == 1:
        values = decoded[0]
    else:
        values = torch.empty(heads, middle, dim, device=blob.device)
        ordinary = torch.ones(middle, dtype=torch.bool, device=blob.device)
        ordinary[salient] = False
        values[:, ordinary], values[:, salient] = decoded
    head_window = take_float(heads * sink * dim).reshape(heads, sink, dim)
    tail_window = take_float(heads * recent * dim).reshape(heads, recent, dim)
    whole = torch.cat([head_window.float(), values, tail_window.float()], dim=1)
    return tools.after_dequantizing(whole, codec).to(dtype)


