"""Checkpointing. Today: synchronous, atomic DCP checkpoints (`persistent.py`). The in-memory
snapshot engine, keeper process and erasure coding build on the Trainer state contract."""

from phalanx.checkpoint.persistent import PersistentCheckpointer

__all__ = ["PersistentCheckpointer"]
