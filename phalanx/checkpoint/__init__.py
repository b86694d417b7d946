"""Checkpointing: asynchronous in-memory snapshots every step (`snapshot.py`), held by a keeper process
per node (`keeper.py`), erasure-coded across nodes (`erasure.py`, `groups.py`), persisted lazily by the
keepers in DCP format to any fsspec URL (`persistent.py`); restore from keeper -> peers -> storage.

Nothing is imported here: a keeper process starts with the standard library only and never imports
torch (parity is coded with numpy; the formats it persists are written by `torchfmt.py`)."""
