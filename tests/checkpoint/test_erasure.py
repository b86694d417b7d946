"""The Reed–Solomon codec: every erasure pattern up to m is rebuilt exactly, more is refused; the native GF(2^8)
kernels (each one this CPU runs) and the torch path give the original implementation's bytes."""

from __future__ import annotations

import random

import pytest
import torch

from phalanx.checkpoint import gf256
from phalanx.checkpoint.erasure import (ErasureCodec, erasure_patterns, gf_inv, gf_mul, gf_mul_xor, join_blocks,
                                        parity_matrix, split_blocks, xor_into)
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


# ------------------------------------------------------------------ native kernels vs torch

ODD_SIZES = (1, 7, 63, 64, 65, 127, 129, 4097)


def _levels() -> list[int]:
    """Every native kernel this CPU runs (portable C, AVX2, GFNI...), or none without a compiler."""
    best = gf256.set_kernel_level(99)
    return list(range(best + 1))


@pytest.fixture(params=["native-best", *[f"native-{lvl}" for lvl in range(4)], "torch"])
def path(request, monkeypatch):
    """Run a test on each bulk-op path: the default native kernel, each lower native kernel, and torch."""
    name = request.param
    if name == "torch":
        monkeypatch.setattr(gf256, "native", lambda: None)
    elif name != "native-best":
        lvl = int(name.split("-")[1])
        if lvl not in _levels():
            pytest.skip(f"kernel {lvl} does not run on this CPU (or no C compiler)")
        gf256.set_kernel_level(lvl)
    yield name
    gf256.set_kernel_level(99)


def _reference_combine(coefficients, blocks):
    """The codec's original torch arithmetic: a 256-entry table row per coefficient, XORed."""
    table = gf256._mul_table("cpu")
    out = torch.zeros_like(blocks[0])
    for c, block in zip(coefficients, blocks):
        out ^= table[c][block.long()]
    return out


def _random(n, seed):
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_native_kernel_builds_on_this_machine():
    assert gf256.native() is not None, "cc should build _gf256.c here and on CI"
    assert gf256.kernel_name() != "torch"


def test_mul_xor_every_coefficient_and_odd_length(path):
    table = gf256._mul_table("cpu")
    for n in ODD_SIZES:
        src = _random(n, n)
        for c in range(256):
            dst = _random(n, c)
            expected = dst ^ table[c][src.long()]
            gf_mul_xor(dst, src, c)
            assert torch.equal(dst, expected), (path, n, c)
        dst = _random(n, 1)
        expected = dst ^ src
        xor_into(dst, src)
        assert torch.equal(dst, expected)


def test_mul_xor_in_place_on_itself(path):
    x = _random(1000, 3)
    expected = x ^ gf256._mul_table("cpu")[29][x.long()]
    gf_mul_xor(x, x, 29)
    assert torch.equal(x, expected)


@pytest.mark.parametrize("seed", range(10))
def test_random_codes_match_reference_and_rebuild_every_pattern(path, seed):
    rng = random.Random(100 + seed)
    k, m = rng.randint(1, 8), rng.randint(0, 4)
    if seed == 0:
        k, m = 8, 4  # the largest, every pattern of up to 4 among 12
    n = rng.choice(ODD_SIZES)
    codec = ErasureCodec(k, m)
    data = [_random(n, 1000 * seed + i) for i in range(k)]
    parity = codec.encode(data)
    assert [p.numel() for p in parity] == [n] * m
    for row, p in zip(codec.parity, parity):  # bitwise identical to the original implementation
        assert torch.equal(p, _reference_combine(row, data)), (path, k, m, n)
    every = dict(enumerate(data + parity))
    for lost in erasure_patterns(k + m, m):
        survivors = {i: b for i, b in every.items() if i not in lost}
        decoded = codec.decode(survivors)
        assert all(torch.equal(a, b) for a, b in zip(decoded, data)), (path, k, m, n, lost)
        if lost:
            rebuilt = codec.rebuild(survivors)
            assert all(torch.equal(rebuilt[i], b) for i, b in every.items()), (path, k, m, n, lost)
    too_many = list(range(m + 1))
    with pytest.raises(PhalanxError, match=rf"lost {m + 1} blocks .* more than the m={m} parity blocks"):
        codec.decode({i: b for i, b in every.items() if i not in too_many})


@pytest.mark.parametrize("k,m", [(1, 1), (4, 2), (5, 3), (8, 4)])
def test_contributions_accumulate_to_encode(path, k, m):
    codec = ErasureCodec(k, m)
    data = [_random(4097, i) for i in range(k)]
    parity = [torch.zeros(4097, dtype=torch.uint8) for _ in range(m)]
    for index in reversed(range(k)):  # any order: XOR commutes
        for acc, part in zip(parity, codec.parity_contributions(index, data[index])):
            xor_into(acc, part)
    assert all(torch.equal(a, b) for a, b in zip(parity, codec.encode(data)))
    with pytest.raises(PhalanxError, match=f"outside 0..{k - 1}"):
        codec.parity_contributions(k, data[0])


def test_encode_into_reused_buffers(path):
    codec = ErasureCodec(4, 2)
    data = [_random(65, i) for i in range(4)]
    out = [torch.full((65,), 7, dtype=torch.uint8) for _ in range(2)]  # stale bytes are overwritten
    assert codec.encode(data, out=out)[0] is out[0]
    assert all(torch.equal(a, b) for a, b in zip(out, codec.encode(data)))
    with pytest.raises(PhalanxError, match="got 1 output blocks for a code with m=2"):
        codec.encode(data, out=out[:1])


def test_bulk_ops_refuse_mismatched_tensors():
    with pytest.raises(ValueError, match="match in length"):
        gf_mul_xor(torch.zeros(3, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="not a byte"):
        gf_mul_xor(torch.zeros(3, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8), 256)
    with pytest.raises(ValueError, match="1-D uint8"):
        xor_into(torch.zeros(3, dtype=torch.uint8), torch.zeros(3))


def test_without_a_compiler_it_warns_once_and_falls_back_to_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    gf256.native.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native GF.* kernel is unavailable"):
            assert gf256.native() is None
        assert gf256.native() is None  # cached: no second warning, no second try
        data = [_random(63, i) for i in range(3)]
        parity = ErasureCodec(3, 2).encode(data)
        assert torch.equal(parity[1], _reference_combine(ErasureCodec(3, 2).parity[1], data))
    finally:
        gf256.native.cache_clear()


def test_build_writes_one_whole_library_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    so = gf256._build(gf256._SOURCE.read_bytes())
    assert so.parent == tmp_path / "phalanx" and so.name.startswith("gf256-") and so.suffix == ".so"
    assert [p.name for p in so.parent.iterdir()] == [so.name]  # the temporary file was renamed, none left over
    assert gf256._build(gf256._SOURCE.read_bytes()) == so  # keyed by the source: built once


def test_large_blocks_on_huge_pages_encode_the_same(path):
    n = (4 << 20) + 4097  # over empty_block's huge-page threshold, not 2 MiB aligned
    data = [_random(n, i) for i in range(2)]
    parity = ErasureCodec(2, 2).encode(data)
    assert torch.equal(parity[0], data[0] ^ data[1])
    assert torch.equal(parity[1], _reference_combine(ErasureCodec(2, 2).parity[1], data))
