"""A tensor codec: how one K or V tensor is coded (the value every layer codec holds), with the
checks that keep its fields consistent. The byte layout it implies is qkv_core.codec.quant's; the
tools that set its optional fields are qkv_core.codec.tools's table.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from qkv_core.errors import RequestError

FP16_BITS = 16
FP32_BITS = 32
OUTLIER_SCALE = 10_000  # TensorCodec.outliers counts per this many values (basis points)
SIDE_BITS = (0, 8)  # TensorCodec.side_bits: 0 fp16 scales and zero points, 8 one byte each on per-part grids
FLOAT_DTYPES = {FP16_BITS: torch.float16, FP32_BITS: torch.float32}


class Entropy(enum.IntEnum):
    # Values equal the wire enum qkvcomm.v1.EntropyCoder.
    NONE = 0
    ZSTD = 1


class Granularity(enum.IntEnum):
    # Values equal the wire enum qkvcomm.v1.Granularity.
    PER_TENSOR = 1
    PER_TOKEN = 2
    PER_CHANNEL = 3
    PER_GROUP = 4


@dataclass(frozen=True)
class TensorCodec:
    bits: int = FP16_BITS
    granularity: Granularity = Granularity.PER_TOKEN
    group_size: int = 0
    sink_tokens: int = 0
    recent_tokens: int = 0
    salient_bits: int = 0  # 0: off; else the width of the salient tokens (token-level mixed precision)
    rotation: int = 0  # 0: off; else the seed of the randomized Hadamard rotation over head_dim
    entropy: Entropy = Entropy.NONE  # lossless coding of the encoded tensor (qkv_core.codec.entropy)
    # keys only: the tensor is coded with RoPE removed, and applied again after decoding; the
    # layer codecs do both (qkv_core.codec.encoding), this module codes whatever it is given
    pre_rope: bool = False
    # non-uniform levels (qkv_core.codec.levels): 2^bits fractions of a row's range, ascending
    # within [0, 1]; () is uniform
    levels: tuple[float, ...] = ()
    # dense-and-sparse: per 10,000 quantized values this many (the farthest from their row's mean,
    # in row standard deviations) are kept exactly in fp16 and left out of their row's range; 0: off
    outliers: int = 0
    # the width of each row's scale and zero point: 0 fp16, 8 one byte each on grids of the part's own
    side_bits: int = 0

    def __post_init__(self) -> None:
        if self.bits not in FLOAT_DTYPES and not 1 <= self.bits <= 8:
            raise RequestError(f"bits must be 1..8, 16 (fp16) or 32 (fp32), got {self.bits}")
        if self.granularity == Granularity.PER_GROUP and self.group_size < 1:
            raise RequestError("per-group quantization needs group_size >= 1")
        if self.salient_bits and (self.is_float or not 1 <= self.salient_bits <= 8):
            raise RequestError(f"salient_bits must be 1..8 on an integer codec, got {self.salient_bits}")
        if self.sink_tokens < 0 or self.recent_tokens < 0:
            raise RequestError("fp16 windows cannot be negative")
        if not 0 <= self.rotation < 1 << 32:
            raise RequestError(f"a rotation seed is 1..2^32-1 (0: none), got {self.rotation}")
        if self.entropy not in iter(Entropy):
            raise RequestError(f"unknown entropy coder {self.entropy}")
        if self.outliers and (self.is_float or self.salient_bits or not 0 < self.outliers <= OUTLIER_SCALE):
            raise RequestError(f"outliers are 1..{OUTLIER_SCALE} per {OUTLIER_SCALE} values of an integer codec "
                               f"without salient tokens, got {self.outliers}")
        if self.levels and (self.is_float or self.salient_bits or len(self.levels) != 1 << self.bits
                            or not all(0.0 <= a < b <= 1.0 for a, b in zip(self.levels, self.levels[1:]))):
            raise RequestError(f"non-uniform levels are 2^bits ascending fractions within [0, 1] of an integer codec "
                               f"without salient tokens; got {len(self.levels)} for {self.bits} bits")
        if self.side_bits not in SIDE_BITS or (self.side_bits and self.is_float):
            raise RequestError(f"side_bits is 0 (fp16 scales) or 8 (compact, integer codecs), got {self.side_bits}")

    @property
    def is_float(self) -> bool:
        """Passthrough in fp16 or fp32, no integer codes."""
        return self.bits in FLOAT_DTYPES
