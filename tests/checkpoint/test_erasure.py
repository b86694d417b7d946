"""The Reed–Solomon codec: every erasure pattern up to m is rebuilt exactly, more is refused."""

from __future__ import annotations

import random

import pytest
import torch

from phalanx.checkpoint.erasure import (ErasureCodec, erasure_patterns, gf_inv, gf_mul, join_blocks, parity_matrix,
                                        split_blocks)
from phalanx.errors import PhalanxError


def test_field_arithmetic():
    for a in range(1, 256):
        assert gf_mul(a, gf_inv(a)) == 1
        assert gf_mul(a, 1) == a and gf_mul(a, 0) == 0
    assert all(gf_mul(a, b) == gf_mul(b, a) for a in range(0, 256, 7) for b in range(0, 256, 11))


@pytest.mark.parametrize("seed", range(12))
def test_random_codes_rebuild_every_pattern_up_to_m(seed):
    rng = random.Random(seed)
    k, m = rng.randint(1, 6), rng.randint(1, 3)
    numel = rng.randint(1, 3001)  # odd sizes too
    flat = torch.randint(0, 256, (numel,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    codec = ErasureCodec(k, m)
    data = split_blocks(flat, k)
    every = {i: b for i, b in enumerate(data + codec.encode(data))}
    for lost in erasure_patterns(k + m, m):
        rebuilt = codec.rebuild({i: b for i, b in every.items() if i not in lost})
        for i, block in every.items():
            assert torch.equal(rebuilt[i], block), (k, m, lost, i)
        assert torch.equal(join_blocks(codec.decode({i: b for i, b in every.items() if i not in lost}), numel), flat)


def test_first_parity_is_xor_and_m1_is_plain_xor():
    data = [torch.randint(0, 256, (257,), dtype=torch.uint8) for _ in range(4)]
    xor = data[0] ^ data[1] ^ data[2] ^ data[3]
    assert torch.equal(ErasureCodec(4, 1).encode(data)[0], xor)
    assert torch.equal(ErasureCodec(4, 3).encode(data)[0], xor)
    assert parity_matrix(4, 2)[0] == [1, 1, 1, 1]


def test_more_than_m_losses_are_refused_with_a_clear_error():
    codec = ErasureCodec(3, 1)
    data = split_blocks(torch.arange(30, dtype=torch.uint8), 3)
    blocks = {i: b for i, b in enumerate(data + codec.encode(data))}
    with pytest.raises(PhalanxError, match=r"lost 2 blocks \[0, 1\], more than the m=1"):
        codec.decode({i: b for i, b in blocks.items() if i not in (0, 1)})


def test_unequal_or_wrong_blocks_are_refused():
    codec = ErasureCodec(2, 1)
    with pytest.raises(PhalanxError, match="differ in length"):
        codec.encode([torch.zeros(3, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)])
    with pytest.raises(PhalanxError, match="uint8"):
        codec.encode([torch.zeros(3), torch.zeros(3)])
