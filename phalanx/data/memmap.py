"""Token files: a flat `.bin` of uint16/uint32 tokens with a `.json` description beside it, or a prepared
folder of shards with its `index.json` (index.py)."""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch

from phalanx.data.index import DTYPES, ShardedTokens, index_path, meta_path, read_index
from phalanx.errors import ConfigError, PhalanxError


def read_meta(bin_path: str) -> dict:
    path = meta_path(bin_path)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def source_meta(path: str) -> dict:
    """What `data.path` says about its tokens (dtype, vocab_size): a folder's index.json or the .bin's .json."""
    index = index_path(path)
    return read_index(index) if index else read_meta(path)


def check_vocab(path: str, vocab_size: int, meta: Optional[dict] = None) -> None:
    """Refuse a token source whose ids do not fit the model's embedding, before anything is built (`meta`:
    its description, when the caller has read it already)."""
    file_vocab: Optional[int] = (meta if meta is not None else source_meta(path)).get("vocab_size")
    if file_vocab is not None and file_vocab > vocab_size:
        raise ConfigError(
            f"data.path='{path}' holds tokens up to {file_vocab - 1} but model.vocab_size={vocab_size}; "
            f"set model.vocab_size >= {file_vocab}"
        )


class MemmapTokens:
    """Windows of `seq_len + 1` tokens from a token file or a prepared folder, in a per-epoch shuffled order.

    A folder's shards are read as one stream, concatenated in index order. The tokens are split into a
    training region and a trailing validation region (`val_fraction`); windows start every `seq_len` tokens
    so each token is a target once per epoch. Sample i is window perm_e[i mod n] of epoch e = i div n, with
    perm_e drawn from (seed, e): the order is a pure function of the index, so the position is one integer.
    """

    def __init__(self, path: str, seq_len: int, seed: int, val_fraction: float, vocab_size: int,
                 dtype: str = "auto"):
        meta = source_meta(path)
        check_vocab(path, vocab_size, meta)
        index = index_path(path)
        if index:
            if dtype not in ("auto", meta["dtype"]):
                raise ConfigError(f"data.dtype={dtype} but '{index}' records {meta['dtype']}; set data.dtype=auto")
            self.tokens: np.ndarray | ShardedTokens = ShardedTokens(os.path.dirname(index), meta)
        else:
            self.tokens = self._open_bin(path, meta.get("dtype", "uint16") if dtype == "auto" else dtype)
        self.path, self.seq_len, self.seed = path, seq_len, seed
        n_val = int(len(self.tokens) * val_fraction)
        self.regions = {"train": (0, len(self.tokens) - n_val), "val": (len(self.tokens) - n_val, len(self.tokens))}
        for split, (lo, hi) in self.regions.items():
            if split == "train" or val_fraction > 0:
                if hi - lo < seq_len + 1:
                    raise ConfigError(
                        f"data.path='{path}': the {split} split has {hi - lo} tokens, fewer than data.seq_len + 1 = "
                        f"{seq_len + 1}; use a larger file, a shorter seq_len or a different data.val_fraction"
                    )
        self._perm_cache: dict[tuple[str, int], torch.Tensor] = {}

    @staticmethod
    def _open_bin(path: str, name: str) -> np.ndarray:
        if name not in DTYPES:
            raise ConfigError(f"token file '{path}': dtype {name!r} is not one of {', '.join(DTYPES)}")
        size = os.path.getsize(path)
        itemsize = np.dtype(DTYPES[name]).itemsize
        if size % itemsize:
            raise PhalanxError(f"token file '{path}' has {size} bytes, not a multiple of {name}'s {itemsize}; "
                               f"is data.dtype right?")
        return np.memmap(path, dtype=DTYPES[name], mode="r")

    def windows(self, split: str) -> int:
        lo, hi = self.regions[split]
        return (hi - lo - 1) // self.seq_len

    def _perm(self, split: str, epoch: int) -> torch.Tensor:
        key = (split, epoch)
        if key not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 2 + (split == "val"))
            self._perm_cache = {key: torch.randperm(self.windows(split), generator=g)}  # keep one epoch
        return self._perm_cache[key]

    def batch(self, indices: list[int], split: str = "train") -> torch.Tensor:
        """(len(indices), seq_len + 1) int64 tokens."""
        n = self.windows(split)
        lo = self.regions[split][0]
        rows = []
        for index in indices:
            start = lo + int(self._perm(split, index // n)[index % n]) * self.seq_len
            rows.append(torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64)))
        return torch.stack(rows)
