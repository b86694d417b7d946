"""Input files of `phalanx data prepare`: which files (globs expanded, sorted), in which format, cut into tasks.

A document is one whole plain-text file, one non-blank line of a .jsonl/.ndjson file (its `--field`), or one
row of a .parquet file (its `--field` column). Tasks are consecutive documents of one file, in input order, so
the order of documents in the output is the order of the inputs whatever the number of workers.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Iterator

from phalanx.errors import PhalanxError

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}  # anything else: text


@dataclass(frozen=True)
class Source:
    path: str  # absolute
    format: str  # text | jsonl | parquet
    bytes: int


def expand_inputs(patterns: list[str]) -> list[Source]:
    """Every input, globs expanded in sorted order, each pattern's files after the previous pattern's."""
    out = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not paths:
                raise PhalanxError(f"input pattern '{pattern}' matches no file; check the path (quote the glob so "
                                   f"the shell does not expand it)")
        elif os.path.isdir(pattern):
            raise PhalanxError(f"input '{pattern}' is a folder; pass its files or a glob such as '{pattern}/*.jsonl'")
        elif not os.path.isfile(pattern):
            raise PhalanxError(f"input '{pattern}' does not exist; pass text, .jsonl or .parquet files or globs")
        else:
            paths = [pattern]
        for path in paths:
            fmt = FORMATS.get(os.path.splitext(path)[1].lower(), "text")
            out.append(Source(os.path.abspath(path), fmt, os.path.getsize(path)))
    return out


def iter_tasks(sources: list[Source], field: str, skip: int = 0, batch_docs: int = 1024,
               batch_bytes: int = 1 << 20) -> Iterator[tuple[tuple, int]]:
    """(task, input bytes it covers) for every document after the first `skip`; a task is what
    `tokenizer.encode_task` takes: (kind, items, field, (path, where)), where is the first row of a parquet
    task, each item's line number in a jsonl task, 1 for a text file."""
    for source in sources:
        reader = {"text": _text_tasks, "jsonl": _jsonl_tasks, "parquet": _parquet_tasks}[source.format]
        for task, n_docs, nbytes in reader(source, field, batch_docs, batch_bytes):
            if skip >= n_docs:  # a resumed prepare: these documents are in complete shards already
                skip -= n_docs
                continue
            if skip:
                kind, items, field_, (path, at) = task
                at = at[skip:] if kind == "jsonl" else at + skip
                task, skip = (kind, items[skip:], field_, (path, at)), 0
            yield task, nbytes


def _text_tasks(source: Source, field: str, batch_docs: int, batch_bytes: int) -> Iterator[tuple[tuple, int, int]]:
    with open(source.path, "rb") as f:
        yield ("text", [f.read()], field, (source.path, 1)), 1, source.bytes


def _jsonl_tasks(source: Source, field: str, batch_docs: int, batch_bytes: int) -> Iterator[tuple[tuple, int, int]]:
    items: list[bytes] = []
    lines: list[int] = []
    size = 0
    with open(source.path, "rb") as f:
        for number, line in enumerate(f, start=1):
            size += len(line)
            if not line.strip():
                continue
            items.append(line)
            lines.append(number)
            if len(items) >= batch_docs or size >= batch_bytes:
                yield ("jsonl", items, field, (source.path, lines)), len(items), size
                items, lines, size = [], [], 0
    if items or size:
        yield ("jsonl", items, field, (source.path, lines)), len(items), size


def _parquet_tasks(source: Source, field: str, batch_docs: int, batch_bytes: int) -> Iterator[tuple[tuple, int, int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PhalanxError(f"input '{source.path}' is parquet, which needs pyarrow: pip install pyarrow") from None
    parquet = pq.ParquetFile(source.path)
    columns = parquet.schema_arrow.names
    if field not in columns:
        raise PhalanxError(f"{source.path} has no column '{field}' (columns: {', '.join(columns)}); "
                           f"name the text column with --field")
    rows = max(parquet.metadata.num_rows, 1)
    row = 1
    for batch in parquet.iter_batches(batch_size=batch_docs, columns=[field]):
        values = batch.column(0).to_pylist()
        yield ("parquet", values, field, (source.path, row)), len(values), source.bytes * len(values) // rows
        row += len(values)
