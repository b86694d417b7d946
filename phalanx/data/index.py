"""A prepared corpus: token shards `shard-NNNNN.bin` plus the `index.json` that describes them.

`phalanx data prepare` writes it (prepare.py); `data.kind: memmap` reads it as one token stream, the shards
concatenated in index order (`ShardedTokens`). The index is written last, so a folder with one is complete.
"""

from __future__ import annotations

import bisect
import json
import os
from typing import Any

import numpy as np

from phalanx.errors import ConfigError, PhalanxError

INDEX = "index.json"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def write_json_atomic(path: str, obj: Any) -> None:
    """Replace `path` with `obj` as JSON so a reader (or a SIGKILL) sees the old file or the new one, never half."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def meta_path(bin_path: str) -> str:
    """The .json description beside a single .bin of tokens (the older one-file form)."""
    return os.path.splitext(bin_path)[0] + ".json"


def index_path(path: str) -> str | None:
    """The index.json that `data.path` names (the folder or the file itself), or None for a single .bin."""
    if os.path.isdir(path):
        return os.path.join(path, INDEX)
    return path if os.path.basename(path) == INDEX else None


def read_index(path: str) -> dict:
    """The index of a prepared folder, checked enough that a reader never indexes past a shard."""
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"data.path: '{path}' does not exist; a folder made by `phalanx data prepare INPUT... "
                          f"--out DIR` holds one (an interrupted prepare has only progress.json: rerun it)") from None
    except (OSError, ValueError) as err:
        raise PhalanxError(f"'{path}' is not a readable JSON index ({err}); rerun `phalanx data prepare` with --force")
    if index.get("dtype") not in DTYPES or not isinstance(index.get("shards"), list) or not index["shards"]:
        raise PhalanxError(f"'{path}' is not a phalanx token index (no dtype or shards); "
                           f"rerun `phalanx data prepare` with --force")
    return index


class ShardedTokens:
    """A read-only view of several token files as one array: `len()` and `[a:b]` slices, in index order.

    Each shard is an np.memmap, so nothing is read until a window touches it; a window that crosses a
    shard boundary is the concatenation of its two pieces.
    """

    def __init__(self, folder: str, index: dict):
        self.dtype = DTYPES[index["dtype"]]
        self.shards, self.starts = [], [0]
        itemsize = np.dtype(self.dtype).itemsize
        for shard in index["shards"]:
            path = os.path.join(folder, shard["file"])
            expected = int(shard["tokens"]) * itemsize
            size = os.path.getsize(path) if os.path.isfile(path) else -1
            if size != expected:
                found = "is missing" if size < 0 else f"has {size} bytes"
                raise PhalanxError(f"shard '{path}' {found}, but the index records {expected} bytes; "
                                   f"rerun `phalanx data prepare` with --force")
            if expected:
                self.shards.append(np.memmap(path, dtype=self.dtype, mode="r"))
                self.starts.append(self.starts[-1] + int(shard["tokens"]))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(len(self))
        assert step == 1, "token windows are contiguous"
        pieces = []
        i = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            lo = self.starts[i]
            end = min(stop, self.starts[i + 1])
            pieces.append(self.shards[i][start - lo:end - lo])
            start, i = end, i + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else np.empty(0, self.dtype)
