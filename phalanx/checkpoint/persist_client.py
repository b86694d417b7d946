"""The trainer's side of persistence. A step persisted while training goes on is written by the keepers
(`keeper.py`), off the training process: a rank only asks its keeper to write it. A step the run waits
for (its end, a stop request) is written by the trainers themselves, every rank its own files at once."""

from __future__ import annotations

import time
from typing import Any, Optional

from phalanx.checkpoint.collectives import CheckpointCollectives
from phalanx.checkpoint.persistent import CheckpointStore
from phalanx.checkpoint.slots import KeeperSlots
from phalanx.checkpoint.wire import WireError
from phalanx.errors import PhalanxError


class PersistClient:
    """Asks this rank's keeper to persist committed steps to `store`; writes the steps the run waits for."""

    def __init__(self, *, slots: KeeperSlots, store: CheckpointStore, collectives: CheckpointCollectives,
                 cfg: Any, rank: int, world_size: int, timeout: float, layout: str):
        self.slots, self.store, self.collectives, self.cfg = slots, store, collectives, cfg
        self.rank, self.world_size, self.timeout = rank, world_size, timeout
        self.info = {"world_size": world_size, "layout": layout}  # into each manifest
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
                        info=self.info, sign=self.cfg.sign)

    def persist_and_wait(self, step: int, block: memoryview, plan: dict[str, Any]) -> Optional[str]:
        """Persist the committed `step`, whose snapshot is `block` (this rank's slot, laid out by `plan`), and
        wait until every rank's files and the manifest are written; returns the checkpoint path on rank 0.
        Collective.

        The ranks write their own files: the run waits for this write, so there is no training left for a
        keeper to take it off. A step a keeper was already asked to persist is left to it; every earlier
        keeper write finishes first, so retention never meets a step still being written."""
        deadline = time.monotonic() + self.timeout
        for earlier in sorted(self.requested):
            status = self._keeper_status(earlier, deadline)
            if earlier == step:
                if "error" in status:
                    raise PhalanxError(f"persisting step {step} failed in the keeper: {status['error']}")
                return status.get("path")
        self.collectives.barrier()  # every rank's keeper is done before any rank writes
        try:
            self.store.write_rank(step, self.rank, block, plan)
            problem = None
        except Exception as err:  # noqa: BLE001 - every rank learns which rank failed, and why
            problem = f"{type(err).__name__}: {err}"
        problems = [(r, p) for r, p in enumerate(self.collectives.all_gather(problem)) if p is not None]
        if problems:
            named = "; ".join(f"rank {r}: {p}" for r, p in problems)
            raise PhalanxError(f"persisting step {step} to checkpoint.storage={self.store.url} failed ({named}); "
                               f"fix the storage and relaunch: the step is still in the keepers' memory, and a "
                               f"folder without its manifest is never loaded")
        if self.rank != 0:
            return None
        return self.store.finalize(step, self.world_size, max(deadline - time.monotonic(), 1.0), self.cfg.keep_last,
                                   self.info)

    def _keeper_status(self, step: int, deadline: float) -> dict[str, Any]:
        """How the keeper's write of `step` went, once this rank's part (rank 0's: the manifest) is done."""
        while time.monotonic() < deadline:
            status = self.slots.call("persist_status", rank=self.rank, step=step)
            if status.get("done"):
                return status
            time.sleep(0.02)
        raise PhalanxError(f"persisting step {step} did not finish within {self.timeout:.0f}s")
