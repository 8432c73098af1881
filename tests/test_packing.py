import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv_core.codec.packing import pack_bits, packed_size, unpack_bits


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_round_trip_any_width(bits, data):
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=200))
    codes = torch.tensor(values, dtype=torch.uint8)
    original = codes.clone()
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(len(values), bits) == (len(values) * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, len(values), bits), codes)
    assert torch.equal(codes, original)  # the input is never modified


@pytest.mark.parametrize(
    ("bits", "codes", "expected"),
    [
        # 4-bit: two per byte, low nibble first.
        (4, [1, 2, 3, 4], [0x21, 0x43]),
        # 2-bit: four per byte, LSB first.
        (2, [0, 1, 2, 3], [0b11_10_01_00]),
        # 6-bit: four per three bytes: 0x3F | 0x00<<6 | 0x15<<12 | 0x2A<<18 = 0xA9503F.
        (6, [0x3F, 0x00, 0x15, 0x2A], [0x3F, 0x50, 0xA9]),
        # 3-bit: eight per three bytes, codes 0..7 -> bit stream 0o76543210 = 0xFAC688.
        (3, list(range(8)), [0x88, 0xC6, 0xFA]),
        # 1-bit: LSB first; a partial byte is zero-padded.
        (1, [1, 0, 1, 1, 0, 0, 0, 0, 1], [0b0000_1101, 0b1]),
        (8, [7, 255], [7, 255]),
    ],
)
def test_golden_byte_layout(bits, codes, expected):
    packed = pack_bits(torch.tensor(codes, dtype=torch.uint8), bits)
    assert packed.tolist() == expected


def test_rejects_bad_width_and_size():
    with pytest.raises(ValueError, match="1..8"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 8, 4)
