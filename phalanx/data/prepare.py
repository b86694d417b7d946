"""`phalanx data prepare INPUT... --out DIR`: tokenize a corpus into token shards plus an index.json.

Documents (sources.py) are tokenized in worker processes (tokenizer.py), each followed by the tokenizer's
end-of-text id, and written in input order into `DIR/shard-NNNNN.bin`; a shard closes at the first document
end at or past `--shard-tokens`, so its boundaries depend on the corpus only, never on `--workers`. After each
shard, `progress.json` records the shards complete and the documents in them: a rerun of the same command skips
those documents and continues to the same shards; `index.json` (index.py) is written last.

The older form `phalanx data prepare TEXT_FILE OUT.bin` (`prepare_bytes`) still writes one .bin of bytes.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from collections import deque
from typing import Callable, Iterator, Optional

import numpy as np

from phalanx.data.index import INDEX, fsync_dir, meta_path, write_json_atomic
from phalanx.data.sources import expand_inputs, iter_tasks
from phalanx.data.tokenizer import TOKENIZER_FILES, TokenizerSpec, encode_task, init_worker, load_spec, sha256_file
from phalanx.errors import PhalanxError

CHUNK = 64 << 20
PROGRESS = "progress.json"
SHARD = "shard-{:05d}.bin"
DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 per shard
FORMAT = "phalanx-token-shards/1"


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
    meta = {"dtype": "uint16", "vocab_size": 256, "tokens": n, "tokenizer": "bytes",
            "source": os.path.abspath(text_path)}
    with open(meta_path(out_path), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


class ShardWriter:
    """Appends whole documents to the open shard; closes it (fsync, rename) at the first document end at or past
    `shard_tokens`, then calls `on_shard(shards, documents_done)` so the caller can record the progress."""

    def __init__(self, out_dir: str, dtype: str, shard_tokens: int, shards: list[dict], documents_done: int,
                 on_shard: Callable[[list[dict], int], None]):
        self.out_dir, self.dtype, self.shard_tokens, self.on_shard = out_dir, dtype, shard_tokens, on_shard
        self.shards, self.documents_done = shards, documents_done
        self._file = None
        self._tokens = self._docs = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents of `lengths` tokens each, `tokens` being all of them in order."""
        ends = np.cumsum(lengths)
        done = 0  # documents of this batch written
        while done < len(lengths):
            base = int(ends[done - 1]) if done else 0
            fills = done + int(np.searchsorted(ends[done:] - base, self.shard_tokens - self._tokens))
            stop = min(fills + 1, len(lengths))  # up to the document that fills the shard, or all of them
            self._write(tokens[base:int(ends[stop - 1])], stop - done)
            done = stop
            if self._tokens >= self.shard_tokens:
                self.close()

    def _write(self, tokens: np.ndarray, documents: int) -> None:
        if self._file is None:
            self._path = os.path.join(self.out_dir, SHARD.format(len(self.shards)))
            self._file, self._digest = open(self._path + ".tmp", "wb"), hashlib.sha256()
        data = memoryview(np.ascontiguousarray(tokens)).cast("B")
        self._file.write(data)
        self._digest.update(data)
        self._tokens += len(tokens)
        self._docs += documents

    def close(self) -> None:
        """Make the open shard durable under its final name and record it (a no-op when none is open)."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._path + ".tmp", self._path)
        fsync_dir(self.out_dir)
        self.documents_done += self._docs
        self.shards.append({"file": os.path.basename(self._path), "tokens": self._tokens, "documents": self._docs,
                            "sha256": self._digest.hexdigest()})
        self._file, self._tokens, self._docs = None, 0, 0
        self.on_shard(self.shards, self.documents_done)


def _ours(name: str) -> bool:
    """Files a prepare writes into its folder (what --force may remove)."""
    base = name[:-4] if name.endswith(".tmp") else name
    return base in (INDEX, PROGRESS, *TOKENIZER_FILES) or (base.startswith("shard-") and base.endswith(".bin"))


def _start_state(out_dir: str, fingerprint: dict, force: bool) -> tuple[list[dict], int]:
    """(complete shards, documents in them) to resume from, after refusing what would overwrite without --force."""
    os.makedirs(out_dir, exist_ok=True)
    names = sorted(os.listdir(out_dir))
    if force:
        for name in names:
            if _ours(name):
                os.remove(os.path.join(out_dir, name))
        return [], 0
    if PROGRESS not in names:  # (a complete corpus, with its index, was refused before hashing the inputs)
        foreign = [n for n in names if not _ours(n)]
        if foreign:
            raise PhalanxError(f"--out '{out_dir}' is not empty (it holds {', '.join(foreign[:3])}"
                               f"{', ...' if len(foreign) > 3 else ''}); choose an empty folder or pass --force")
        for name in names:  # a prepare killed before it recorded its first shard: nothing complete to keep
            os.remove(os.path.join(out_dir, name))
        return [], 0
    with open(os.path.join(out_dir, PROGRESS)) as f:
        progress = json.load(f)
    before = progress.get("fingerprint", {})
    if before != fingerprint:
        differ = sorted(k for k in set(before) | set(fingerprint) if before.get(k) != fingerprint.get(k))
        raise PhalanxError(f"'{out_dir}' holds an interrupted prepare of other {', '.join(differ)}; rerun that "
                           f"command to resume it, or pass --force to start over with this one")
    itemsize = np.dtype(fingerprint["dtype"]).itemsize
    for shard in progress["shards"]:
        path = os.path.join(out_dir, shard["file"])
        if not os.path.isfile(path) or os.path.getsize(path) != shard["tokens"] * itemsize:
            raise PhalanxError(f"shard '{path}' does not match {PROGRESS} (missing or another size); "
                               f"pass --force to start over")
    return list(progress["shards"]), int(progress["documents_done"])


@contextlib.contextmanager
def _encoder(spec: TokenizerSpec, workers: int) -> Iterator:
    """A function mapping an iterable of tasks to their results in order, `workers` processes deep.

    forkserver (spawn where there is none) because the parent may hold torch's threads, which fork would copy
    in an unknown state; the number of tasks in flight is bounded so a large corpus is never read ahead."""
    if workers == 1:
        init_worker(spec)
        yield lambda tasks: (encode_task(t) for t in tasks), lambda fn, xs: list(map(fn, xs))
        return
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["__main__", "phalanx.data.tokenizer"])  # imported once, before the forks
    else:
        ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=init_worker, initargs=(spec, True)) as pool:
        def ordered(tasks):
            pending: deque = deque()
            for task in tasks:
                pending.append(pool.apply_async(encode_task, (task,)))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()

        yield ordered, pool.map


def prepare_corpus(inputs: list[str], out_dir: str, tokenizer: Optional[str] = None, field: str = "text",
                   workers: int = 1, shard_tokens: int = DEFAULT_SHARD_TOKENS, eos_token: Optional[str] = None,
                   force: bool = False, progress: bool = False, batch_docs: int = 1024) -> dict:
    """Tokenize `inputs` (files or globs) into `out_dir`'s shards and index.json; returns the index."""
    from tqdm import tqdm

    if workers < 1:
        raise PhalanxError(f"--workers {workers}: need at least 1")
    if shard_tokens < 1:
        raise PhalanxError(f"--shard-tokens {shard_tokens}: need at least 1")
    sources = expand_inputs(inputs)
    spec = load_spec(tokenizer, eos_token)
    out_dir = os.path.abspath(out_dir)
    if os.path.isfile(os.path.join(out_dir, INDEX)) and not force:  # before hashing a corpus for nothing
        raise PhalanxError(f"'{out_dir}' already holds a prepared corpus ({INDEX}); choose another --out or pass "
                           f"--force to replace it")
    with _encoder(spec, workers) as (encode, map_):
        digests = map_(sha256_file, [s.path for s in sources])
        fingerprint = {
            "format": FORMAT, "dtype": spec.dtype, "field": field, "shard_tokens": shard_tokens,
            "tokenizer": spec.sha256, "eos_id": spec.eos_id, "vocab_size": spec.vocab_size,
            "inputs": [{"path": s.path, "format": s.format, "bytes": s.bytes, "sha256": d}
                       for s, d in zip(sources, digests)],
        }
        shards, documents_done = _start_state(out_dir, fingerprint, force)

        def record(shards: list[dict], documents_done: int) -> None:
            write_json_atomic(os.path.join(out_dir, PROGRESS), {"fingerprint": fingerprint, "shards": shards,
                                                                "documents_done": documents_done})

        writer = ShardWriter(out_dir, spec.dtype, shard_tokens, shards, documents_done, record)
        tasks = iter_tasks(sources, field, skip=documents_done, batch_docs=batch_docs)
        sizes: deque = deque()

        def counted() -> Iterator[tuple]:
            for task, nbytes in tasks:
                sizes.append(nbytes)
                yield task

        bar = tqdm(total=sum(s.bytes for s in sources), unit="B", unit_scale=True, file=sys.stderr,
                   desc="prepare", disable=not progress)
        with bar:
            for tokens, lengths in encode(counted()):
                writer.add(tokens, lengths)
                bar.update(sizes.popleft())
            writer.close()
    total = sum(s["tokens"] for s in writer.shards)
    if total < 2:
        raise PhalanxError(f"inputs {' '.join(inputs)} hold {total} tokens; a corpus needs at least 2")
    copied = []
    for path in spec.files:  # under their HF names, so `phalanx ckpt export --format hf` ships them as they are
        name = os.path.basename(path) if os.path.basename(path) in TOKENIZER_FILES else "tokenizer.json"
        shutil.copyfile(path, os.path.join(out_dir, name + ".tmp"))
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
        copied.append(name)
    index = {
        "format": FORMAT, "dtype": spec.dtype, "vocab_size": spec.vocab_size, "eos_id": spec.eos_id,
        "eos_token": spec.eos_token, "bos_id": spec.bos_id, "tokenizer": {**spec.describe(), "files": copied},
        "field": field, "shard_tokens": shard_tokens, "tokens": total, "documents": writer.documents_done,
        "shards": writer.shards, "sources": fingerprint["inputs"],
    }
    write_json_atomic(os.path.join(out_dir, INDEX), index)
    for name in glob.glob(os.path.join(out_dir, PROGRESS + "*")):
        os.remove(name)
    return index
