"""The Triton kernels behind qkv_core.codec.kernels (its docstring says what they compute and how
it matches the torch path). Imported only where triton is installed."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_fp16(x, UP: tl.constexpr):
    """x rounded to fp16 toward +inf (UP) or -inf, as fp16: the stored value bounds x."""
    h = x.to(tl.float16)
    b = h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    positive = b < 0x8000
    if UP:
        wrong = h.to(tl.float32) < x
        moved = tl.where(b == 0x8000, 1, tl.where(positive, b + 1, b - 1))
    else:
        wrong = h.to(tl.float32) > x
        moved = tl.where(b == 0, 0x8001, tl.where(positive, b - 1, b + 1))
    b = tl.where(wrong, moved, b)
    return b.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def side(low, high, QMAX: tl.constexpr):
    """(zero, scale) as fp16 and as the fp32 the codes use, from each row's min and max."""
    zero16 = round_fp16(low, False)
    zero = zero16.to(tl.float32)
    scale16 = round_fp16(tl.math.div_rn(high - zero, QMAX * 1.0), True)
    scale = scale16.to(tl.float32)
    return zero16, scale16, zero, scale


@triton.jit
def load_rows(x_ptr, rot_ptr, head, t0, T, stride_h, stride_t, D: tl.constexpr, BT: tl.constexpr,
              ROT: tl.constexpr):
    """[BT, D] fp32 of head `head` from token t0 (rows past T are 0 and masked), rotated with ROT."""
    t = t0 + tl.arange(0, BT)
    c = tl.arange(0, D)
    ok = (t < T)[:, None]
    x = tl.load(x_ptr + head * stride_h + t[:, None] * stride_t + c[None, :], mask=ok, other=0.0)
    x = x.to(tl.float32)
    if ROT:
        m = tl.load(rot_ptr + head * D * D + c[:, None] * D + c[None, :])
        x = tl.dot(x, m, input_precision="ieee")
    return x, t, ok


@triton.jit
def store_codes(out_ptr, x, zero, scale, t, ok, head, T, D: tl.constexpr, B: tl.constexpr,
                BT: tl.constexpr, BP: tl.constexpr):
    """Codes of the [BT, D] tile, packed: token row t of head h at bytes ((h*T + t) * D * B/8)."""
    safe = tl.where(scale > 0, scale, 1.0)  # a constant row's scale is 0: its codes are all 0
    inv = tl.where(scale > 0, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), safe), 0.0)
    units = (x - (zero - scale * 0.5)) * inv
    codes = units.to(tl.int32).to(tl.int64)
    words = tl.sum(tl.reshape(codes, (BT, D // 8, 8)) << (tl.arange(0, 8) * B).to(tl.int64)[None, None, :],
                   axis=2)
    k = tl.arange(0, BP)
    data = (words[:, :, None] >> (k * 8).to(tl.int64)[None, None, :]) & 255
    w = tl.arange(0, D // 8)
    offset = (head * T + t)[:, None, None] * (D * B // 8) + w[None, :, None] * B + k[None, None, :]
    tl.store(out_ptr + offset, data.to(tl.uint8), mask=ok[:, :, None] & (k < B)[None, None, :])


@triton.jit
def encode_per_token(x_ptr, rot_ptr, out_ptr, side_ptr, T, stride_h, stride_t, rows,
                     D: tl.constexpr, B: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr,
                     ROT: tl.constexpr):
    head, t0 = tl.program_id(0), tl.program_id(1) * BT
    x, t, ok = load_rows(x_ptr, rot_ptr, head, t0, T, stride_h, stride_t, D, BT, ROT)
    low = tl.where(t < T, tl.min(tl.where(ok, x, float("inf")), axis=1), 0.0)  # rows past T: 0, never stored
    high = tl.where(t < T, tl.max(tl.where(ok, x, float("-inf")), axis=1), 0.0)
    zero16, scale16, zero, scale = side(low, high, (1 << B) - 1)
    row = head * T + t
    tl.store(side_ptr + row, scale16, mask=t < T)  # scales, then zero points, per row (head, token)
    tl.store(side_ptr + rows + row, zero16, mask=t < T)
    store_codes(out_ptr, x, zero[:, None], scale[:, None], t, ok, head, T, D, B, BT, BP)


@triton.jit
def channel_stats(x_ptr, rot_ptr, stats_ptr, side_ptr, T, stride_h, stride_t, rows,
                  D: tl.constexpr, B: tl.constexpr, BT: tl.constexpr, ROT: tl.constexpr):
    """Per (head, channel): min and max over every token; writes the fp16 side and fp32 stats."""
    head = tl.program_id(0)
    low = tl.full((D,), float("inf"), tl.float32)
    high = tl.full((D,), float("-inf"), tl.float32)
    for t0 in range(0, T, BT):
        x, t, ok = load_rows(x_ptr, rot_ptr, head, t0, T, stride_h, stride_t, D, BT, ROT)
        low = tl.minimum(low, tl.min(tl.where(ok, x, float("inf")), axis=0))
        high = tl.maximum(high, tl.max(tl.where(ok, x, float("-inf")), axis=0))
    zero16, scale16, zero, scale = side(low, high, (1 << B) - 1)
    c = tl.arange(0, D)
    tl.store(side_ptr + head * D + c, scale16)  # rows (head, channel)
    tl.store(side_ptr + rows + head * D + c, zero16)
    tl.store(stats_ptr + head * 2 * D + c, zero)
    tl.store(stats_ptr + head * 2 * D + D + c, scale)


@triton.jit
def encode_per_channel(x_ptr, rot_ptr, out_ptr, stats_ptr, T, stride_h, stride_t,
                       D: tl.constexpr, B: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr,
                       ROT: tl.constexpr):
    head, t0 = tl.program_id(0), tl.program_id(1) * BT
    x, t, ok = load_rows(x_ptr, rot_ptr, head, t0, T, stride_h, stride_t, D, BT, ROT)
    c = tl.arange(0, D)
    zero = tl.load(stats_ptr + head * 2 * D + c)
    scale = tl.load(stats_ptr + head * 2 * D + D + c)
    store_codes(out_ptr, x, zero[None, :], scale[None, :], t, ok, head, T, D, B, BT, BP)


@triton.jit
def decode(blob_ptr, side_ptr, rot_ptr, out_ptr, T, stride_h, stride_t, rows,
           D: tl.constexpr, B: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr,
           PER_TOKEN: tl.constexpr, ROT: tl.constexpr):
    head, t0 = tl.program_id(0), tl.program_id(1) * BT
    t = t0 + tl.arange(0, BT)
    ok = t < T
    k = tl.arange(0, BP)
    w = tl.arange(0, D // 8)
    offset = (head * T + t)[:, None, None] * (D * B // 8) + w[None, :, None] * B + k[None, None, :]
    data = tl.load(blob_ptr + offset, mask=ok[:, None, None] & (k < B)[None, None, :], other=0)
    words = tl.sum(data.to(tl.int64) << (k * 8).to(tl.int64)[None, None, :], axis=2)
    i = tl.arange(0, 8)
    codes = (words[:, :, None] >> (i * B).to(tl.int64)[None, None, :]) & ((1 << B) - 1)
    units = tl.reshape(codes, (BT, D)).to(tl.float32)
    c = tl.arange(0, D)
    if PER_TOKEN:
        row = head * T + t
        scale = tl.load(side_ptr + row, mask=ok, other=0.0).to(tl.float32)[:, None]
        zero = tl.load(side_ptr + rows + row, mask=ok, other=0.0).to(tl.float32)[:, None]
    else:
        scale = tl.load(side_ptr + head * D + c).to(tl.float32)[None, :]
        zero = tl.load(side_ptr + rows + head * D + c).to(tl.float32)[None, :]
    x = units * scale
    x = x + zero
    if ROT:  # the inverse rotation: the transposed matrix
        m = tl.load(rot_ptr + head * D * D + c[None, :] * D + c[:, None])
        x = tl.dot(x, m, input_precision="ieee")
    if out_ptr.dtype.element_ty == tl.bfloat16:  # round to nearest even by hand (the interpreter truncates)
        b = x.to(tl.int32, bitcast=True)
        y = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + head * stride_h + t[:, None] * stride_t + c[None, :], y, mask=ok[:, None])
