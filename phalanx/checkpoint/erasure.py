"""Reed–Solomon erasure coding over GF(2^8) on torch tensors (CPU or GPU), systematic, k data + m parity.

The parity rows form a Cauchy matrix with its first row scaled to all ones: every k x k submatrix of
[I; P] is invertible (all minors of a Cauchy matrix are non-zero and scaling rows and columns keeps
them so), so any m lost blocks of a group are rebuilt from any k survivors, and the first parity
block is the plain XOR of the data (the m = 1 fast path). Blocks are equal-length uint8 tensors;
`split_blocks` / `join_blocks` pad and cut a flat byte tensor.

Status: the codec of the checkpointing issue, correct and tested; multiplying by a constant is a
256-entry table lookup per byte, which is not yet the issue's encode speed (see the closing note).
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch

from phalanx.errors import PhalanxError

_POLY = 0x11D  # x^8 + x^4 + x^3 + x^2 + 1, the usual Reed–Solomon field polynomial


def _tables() -> tuple[list[int], list[int]]:
    exp, log = [0] * 512, [0] * 256
    x = 1
    for i in range(255):
        exp[i], log[x] = x, i
        x <<= 1
        if x & 0x100:
            x ^= _POLY
    for i in range(255, 512):
        exp[i] = exp[i - 255]
    return exp, log


EXP, LOG = _tables()


def gf_mul(a: int, b: int) -> int:
    return 0 if a == 0 or b == 0 else EXP[LOG[a] + LOG[b]]


def gf_inv(a: int) -> int:
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return EXP[255 - LOG[a]]


@lru_cache(maxsize=None)
def _mul_table(device: str) -> torch.Tensor:
    """(256, 256) uint8: row c is c * x for every byte x."""
    table = torch.tensor([[gf_mul(c, x) for x in range(256)] for c in range(256)], dtype=torch.uint8)
    return table.to(device)


def parity_matrix(k: int, m: int) -> list[list[int]]:
    """(m, k) Cauchy matrix 1 / (x_i + y_j), x_i = i, y_j = m + j, columns scaled so row 0 is all ones."""
    if k < 1 or m < 0 or k + m > 256:
        raise PhalanxError(f"erasure code k={k}, m={m}: need k >= 1, m >= 0 and k + m <= 256 over GF(2^8)")
    rows = [[gf_inv(i ^ (m + j)) for j in range(k)] for i in range(m)]
    if m:
        scale = [gf_inv(rows[0][j]) for j in range(k)]
        rows = [[gf_mul(rows[i][j], scale[j]) for j in range(k)] for i in range(m)]
    return rows


def _invert(matrix: list[list[int]]) -> list[list[int]]:
    """Gauss–Jordan inverse of a square matrix over GF(2^8)."""
    n = len(matrix)
    a = [row[:] + [int(i == j) for j in range(n)] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if a[r][col])
        a[col], a[pivot] = a[pivot], a[col]
        inv = gf_inv(a[col][col])
        a[col] = [gf_mul(v, inv) for v in a[col]]
        for r in range(n):
            if r != col and a[r][col]:
                f = a[r][col]
                a[r] = [v ^ gf_mul(f, w) for v, w in zip(a[r], a[col])]
    return [row[n:] for row in a]


class ErasureCodec:
    """k data blocks -> m parity blocks; any k of the k + m rebuild the rest."""

    def __init__(self, k: int, m: int):
        self.k, self.m = k, m
        self.parity = parity_matrix(k, m)

    def _combine(self, coefficients: list[int], blocks: list[torch.Tensor]) -> torch.Tensor:
        """XOR over j of coefficients[j] * blocks[j] (GF(2^8), bytewise)."""
        table = _mul_table(str(blocks[0].device))
        out = torch.zeros_like(blocks[0])
        for c, block in zip(coefficients, blocks):
            if c == 0:
                continue
            out ^= block if c == 1 else table[c][block.long()]
        return out

    def _check(self, blocks: list[torch.Tensor], what: str) -> None:
        if any(b.dtype != torch.uint8 or b.dim() != 1 for b in blocks):
            raise PhalanxError(f"{what}: blocks must be 1-D uint8 tensors (see split_blocks)")
        if len({b.numel() for b in blocks}) > 1:
            raise PhalanxError(f"{what}: blocks differ in length {sorted({b.numel() for b in blocks})}; pad them "
                               f"to one length (split_blocks does)")

    def encode(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(data) != self.k:
            raise PhalanxError(f"encode: got {len(data)} data blocks for a code with k={self.k}")
        self._check(data, "encode")
        return [self._combine(row, data) for row in self.parity]

    def decode(self, blocks: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """The k data blocks from any k of the k + m (index < k: data, k + i: parity i)."""
        lost = [i for i in range(self.k + self.m) if i not in blocks]
        if len(lost) > self.m:
            raise PhalanxError(f"erasure group lost {len(lost)} blocks {lost}, more than the m={self.m} parity blocks "
                               f"can rebuild; restore from persistent storage instead")
        if all(i in blocks for i in range(self.k)):
            return [blocks[i] for i in range(self.k)]
        use = sorted(blocks)[: self.k]
        self._check([blocks[i] for i in use], "decode")
        generator = [[int(i == j) for j in range(self.k)] if i < self.k else self.parity[i - self.k] for i in use]
        inverse = _invert(generator)
        chosen = [blocks[i] for i in use]
        return [blocks[r] if r in blocks else self._combine(inverse[r], chosen) for r in range(self.k)]

    def rebuild(self, blocks: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Every block, data and parity, from any k of them."""
        data = self.decode(blocks)
        out = dict(enumerate(data))
        out.update({self.k + i: p for i, p in enumerate(self.encode(data))})
        return out


def split_blocks(flat: torch.Tensor, k: int) -> list[torch.Tensor]:
    """A flat uint8 tensor -> k equal blocks, zero-padded at the end (keep `flat.numel()` to join)."""
    size = -(-flat.numel() // k)
    padded = torch.zeros(size * k, dtype=torch.uint8, device=flat.device)
    padded[: flat.numel()] = flat
    return list(padded.view(k, size).unbind(0))


def join_blocks(blocks: list[torch.Tensor], numel: int) -> torch.Tensor:
    return torch.cat(blocks)[:numel]


def erasure_patterns(n: int, m: int) -> itertools.chain:
    """Every set of at most m lost block indices among n (for tests and drills)."""
    return itertools.chain.from_iterable(itertools.combinations(range(n), r) for r in range(m + 1))
