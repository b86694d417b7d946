"""The trainer's side of persistence: a committed step is written to the persistent store by the keepers
(`keeper.py`), off the training process; a rank only asks its keeper to write and polls how it went."""

from __future__ import annotations

import time
from typing import Any, Optional

from phalanx.checkpoint.collectives import CheckpointCollectives
from phalanx.checkpoint.persistent import CheckpointStore
from phalanx.checkpoint.slots import KeeperSlots
from phalanx.checkpoint.wire import WireError
from phalanx.errors import PhalanxError


class PersistClient:
    """Asks this rank's keeper to persist committed steps to `store`, and waits for it when told to."""

    def __init__(self, *, slots: KeeperSlots, store: CheckpointStore, collectives: CheckpointCollectives,
                 cfg: Any, rank: int, world_size: int, timeout: float):
        self.slots, self.store, self.collectives, self.cfg = slots, store, collectives, cfg
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self.requested: set[int] = set()

    def busy(self) -> bool:
        """Whether the keeper is still writing an earlier step (an unreachable keeper counts as busy)."""
        try:
            return bool(self.slots.call("persist_busy", rank=self.rank)["busy"])
        except WireError:
            return True

    def request(self, step: int) -> None:
        """Ask the keeper to persist `step` (once per step); rank 0's keeper writes the manifest."""
        if step in self.requested:
            return
        self.requested.add(step)
        self.slots.call("persist", rank=self.rank, step=step, storage=self.store.url, world_size=self.world_size,
                        coordinator=self.rank == 0, timeout_s=self.timeout, keep_last=self.cfg.keep_last,
                        info={"world_size": self.world_size}, sign=self.cfg.sign)

    def persist_and_wait(self, step: int) -> Optional[str]:
        """Persist the committed `step` and wait until this rank's part (rank 0: the manifest) is written;
        returns the checkpoint path on rank 0. Collective."""
        deadline = time.monotonic() + self.timeout
        while step not in self.requested and self.busy():  # an earlier write finishes first
            if time.monotonic() > deadline:
                raise PhalanxError(f"an earlier persistent write did not finish within {self.timeout:.0f}s")
            time.sleep(0.02)
        self.collectives.barrier()  # every rank's keeper is free before any is asked
        self.request(step)
        while time.monotonic() < deadline:
            status = self.slots.call("persist_status", rank=self.rank, step=step)
            if status.get("done"):
                if "error" in status:
                    raise PhalanxError(f"persisting step {step} failed in the keeper: {status['error']}")
                return status.get("path")
            time.sleep(0.02)
        raise PhalanxError(f"persisting step {step} did not finish within {self.timeout:.0f}s")
