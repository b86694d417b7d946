"""Checkpointing: asynchronous in-memory snapshots every step (`snapshot.py`), held by a keeper process
per node (`keeper.py`), erasure-coded across nodes (`erasure.py`, `groups.py`), persisted lazily by the
keepers in DCP format to any fsspec URL (`persistent.py`); restore from keeper -> peers -> storage."""

from phalanx.checkpoint.persistent import CheckpointStore

__all__ = ["CheckpointStore"]
