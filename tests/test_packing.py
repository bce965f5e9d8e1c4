"""int4/int8 packing: round trip, and the exact compressed-tensors pack_to_int32 bit layout."""

from __future__ import annotations

import pytest
import torch

from vllm_aser.kernels.reference import pack_int, unpack_int


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("in_features", [8, 13, 72, 130])
def test_roundtrip(bits, in_features):
    qmax = 2 ** (bits - 1) - 1
    q = torch.randint(-qmax, qmax + 1, (5, in_features), dtype=torch.int8)
    packed = pack_int(q, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, -(-in_features * bits // 32))
    assert torch.equal(unpack_int(packed, bits, in_features), q)


def test_int4_bit_layout():
    """Element j of each group of 8 sits in bits 4j..4j+3 (LSB first), offset by +8 to unsigned."""
    q = torch.tensor([[-7, -1, 0, 1, 2, 3, 7, -8]], dtype=torch.int8)
    packed = pack_int(q, 4)
    expected = 0
    for j, value in enumerate(q[0].tolist()):
        expected |= (value + 8) << (4 * j)
    expected = expected - (1 << 32) if expected >= 1 << 31 else expected  # as signed int32
    assert packed.tolist() == [[expected]]
