"""A synthetic token stream with learnable structure, deterministic per sample index.

Each sequence follows a fixed bijective map of the vocabulary, x[t+1] = (a * x[t] + c) mod V,
except that with probability `noise` a token is drawn uniformly (and the chain continues from
it). A model that learns the map predicts all but the noisy tokens, so the loss floor is about
noise * ln(V) + H(noise), far below ln(V). Sample i depends only on (seed, split, i), so a
global batch is the same whatever the data-parallel split and resumes exactly.
"""

from __future__ import annotations

import math

import torch


def _mix(*values: int) -> int:
    """A 63-bit hash of integers (splitmix64 rounds), used as a per-sample generator seed."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class SyntheticTokens:
    """Samples of `seq_len + 1` tokens (inputs and shifted targets) from a noisy affine chain."""

    SPLITS = {"train": 0, "val": 1}

    def __init__(self, vocab_size: int, seq_len: int, seed: int, noise: float):
        self.vocab_size, self.seq_len, self.seed, self.noise = vocab_size, seq_len, seed, noise
        g = torch.Generator().manual_seed(_mix(seed, 0xC4A1))
        a = int(torch.randint(1, vocab_size, (1,), generator=g)) if vocab_size > 1 else 1
        while math.gcd(a, vocab_size) != 1:  # coprime: the map is a bijection
            a = a % (vocab_size - 1) + 1
        c = int(torch.randint(0, vocab_size, (1,), generator=g))
        # k applications of x -> a x + c give x -> A[k] x + C[k] (mod V); tables over k = 0..seq_len.
        n = seq_len + 1
        A, C = [1], [0]
        for _ in range(1, n):
            A.append(A[-1] * a % vocab_size)
            C.append((C[-1] * a + c) % vocab_size)
        self._A = torch.tensor(A, dtype=torch.int64)
        self._C = torch.tensor(C, dtype=torch.int64)
        self._pos = torch.arange(n)

    def batch(self, indices: list[int], split: str = "train") -> torch.Tensor:
        """(len(indices), seq_len + 1) int64 tokens."""
        n = self.seq_len + 1
        salt = self.SPLITS[split]
        fresh = torch.empty(len(indices), n, dtype=torch.int64)
        reset = torch.empty(len(indices), n, dtype=torch.bool)
        g = torch.Generator()
        for row, index in enumerate(indices):
            g.manual_seed(_mix(self.seed, salt, index))
            fresh[row] = torch.randint(0, self.vocab_size, (n,), generator=g)
            reset[row] = torch.rand(n, generator=g) < self.noise
        reset[:, 0] = True
        # Position of the last reset at or before t, then k = t - that position steps along the chain.
        last = torch.where(reset, self._pos, torch.zeros_like(self._pos)).cummax(dim=1).values
        start = fresh.gather(1, last)
        k = self._pos - last
        return (self._A[k] * start + self._C[k]) % self.vocab_size
