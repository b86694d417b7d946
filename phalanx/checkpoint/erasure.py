"""Reed–Solomon erasure coding over GF(2^8) on torch tensors (CPU or GPU), systematic, k data + m parity.

The parity rows form a Cauchy matrix with its first row scaled to all ones: every k x k submatrix of
[I; P] is invertible (all minors of a Cauchy matrix are non-zero and scaling rows and columns keeps
them so), so any m lost blocks of a group are rebuilt from any k survivors, and the first parity
block is the plain XOR of the data (the m = 1 fast path). Blocks are equal-length uint8 tensors;
`split_blocks` / `join_blocks` pad and cut a flat byte tensor.

The bytes are multiplied in gf256.py: a native C kernel for CPU tensors (memory-bound; benchmarks/erasure.py),
torch table lookups for GPU tensors or where no C compiler is found. Both give the
same bytes. A parity holder can also build its parity one data block at a time: `parity_contributions` of each
data block, XORed together with `xor_into`, equal `encode`.
"""

from __future__ import annotations

import itertools

import torch

from phalanx.checkpoint.gf256 import empty_block, gf_dot, gf_inv, gf_mul, gf_mul_xor, xor_into
from phalanx.errors import PhalanxError

# gf_mul_xor and xor_into belong to this module's API too: parity holders accumulate with them.
__all__ = ["ErasureCodec", "erasure_patterns", "gf_inv", "gf_mul", "gf_mul_xor", "join_blocks", "parity_matrix",
           "split_blocks", "xor_into"]

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

    def _check(self, blocks: list[torch.Tensor], what: str) -> None:
        if any(b.dtype != torch.uint8 or b.dim() != 1 for b in blocks):
            raise PhalanxError(f"{what}: blocks must be 1-D uint8 tensors (see split_blocks)")
        if len({b.numel() for b in blocks}) > 1:
            raise PhalanxError(f"{what}: blocks differ in length {sorted({b.numel() for b in blocks})}; pad them "
                               f"to one length (split_blocks does)")

    def encode(self, data: list[torch.Tensor], out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The m parity blocks of k data blocks, written into `out` (m blocks like the data, not overlapping
        it) when given.

        Reusing `out` across checkpoints saves the first-touch page faults of fresh parity tensors, which
        can cost more than the native kernel's arithmetic (benchmarks/erasure.py, "reused out").
        """
        if len(data) != self.k:
            raise PhalanxError(f"encode: got {len(data)} data blocks for a code with k={self.k}")
        self._check(data, "encode")
        if out is not None:
            if len(out) != self.m:
                raise PhalanxError(f"encode: got {len(out)} output blocks for a code with m={self.m}")
            self._check(list(data) + list(out), "encode")
            if any(o.device != data[0].device for o in out):
                raise PhalanxError(f"encode: output blocks must be on the data's device {data[0].device}")
        parity = [empty_block(data[0]) for _ in range(self.m)] if out is None else list(out)
        gf_dot(parity, data, self.parity)  # one pass over the data for all m parity blocks
        return parity

    def parity_contributions(self, index: int, block: torch.Tensor) -> list[torch.Tensor]:
        """Data block `index`'s share of each parity block: [parity[j][index] * block for j < m].

        Parity j is the XOR over data indices of contribution j, so a parity holder can accumulate the
        contributions of data ranks one at a time (`xor_into`) instead of holding all k data blocks.
        """
        if not 0 <= index < self.k:
            raise PhalanxError(f"parity_contributions: data index {index} is outside 0..{self.k - 1} (k={self.k})")
        self._check([block], "parity_contributions")
        out = [empty_block(block) for _ in range(self.m)]
        gf_dot(out, [block], [[row[index]] for row in self.parity])
        return out

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
        missing = [r for r in range(self.k) if r not in blocks]
        rebuilt = [empty_block(blocks[use[0]]) for _ in missing]
        gf_dot(rebuilt, [blocks[i] for i in use], [inverse[r] for r in missing])  # one pass for every lost block
        found = dict(zip(missing, rebuilt))
        return [blocks[r] if r in blocks else found[r] for r in range(self.k)]

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
