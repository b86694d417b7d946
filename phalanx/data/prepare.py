"""`phalanx data prepare TEXT_FILE OUT.bin`: byte-level tokens (vocab 256), no downloads."""

from __future__ import annotations

import json
import os

import numpy as np

from phalanx.data.memmap import meta_path
from phalanx.errors import PhalanxError

CHUNK = 64 << 20


def prepare_bytes(text_path: str, out_path: str, force: bool = False) -> dict:
    """Write every byte of `text_path` as a uint16 token to `out_path`, plus its .json description."""
    if not os.path.isfile(text_path):
        raise PhalanxError(f"text file '{text_path}' does not exist; pass a path to a UTF-8 or any byte file")
    if not out_path.endswith(".bin"):
        raise PhalanxError(f"output '{out_path}' must end in .bin (its description goes to a .json beside it)")
    for path in (out_path, meta_path(out_path)):
        if os.path.exists(path) and not force:
            raise PhalanxError(f"'{path}' already exists; choose another output or pass --force to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    n = 0
    with open(text_path, "rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(CHUNK):
            np.frombuffer(chunk, dtype=np.uint8).astype(np.uint16).tofile(dst)
            n += len(chunk)
    if n < 2:
        os.remove(tmp)
        raise PhalanxError(f"text file '{text_path}' has {n} bytes; it needs at least 2 tokens")
    os.replace(tmp, out_path)
    meta = {"dtype": "uint16", "vocab_size": 256, "tokens": n, "tokenizer": "bytes", "source": os.path.abspath(text_path)}
    with open(meta_path(out_path), "w") as f:
        json.dump(meta, f, indent=2)
    return meta
