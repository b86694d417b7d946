"""Persistent checkpoints: torch.distributed.checkpoint (DCP) in `checkpoints/step-N/`.

A checkpoint is written to `step-N.partial/` by every rank, then rank 0 writes
`manifest.json` and renames the folder to `step-N/`: a folder without a manifest is never
loaded. Rank-local state (RNG streams) goes to `rank-R.pt` beside the DCP shards, since DCP
would keep one copy of a key that every rank holds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from phalanx.errors import PhalanxError

STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
# In a one-process run there is no process group and DCP says it assumes one process: intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class PersistentCheckpointer:
    """Synchronous, atomic DCP checkpoints with retention. Every rank calls save/load together."""

    def __init__(self, root: str, rank: int, world_size: int, keep_last: int, rank_local_keys: tuple[str, ...]):
        self.root, self.rank, self.world_size, self.keep_last = root, rank, world_size, keep_last
        self.rank_local_keys = rank_local_keys

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step-{step}")

    def committed_steps(self) -> list[int]:
        """Steps whose checkpoint has a manifest, oldest first."""
        if not os.path.isdir(self.root):
            return []
        steps = []
        for name in os.listdir(self.root):
            match = STEP_DIR.match(name)
            if match and os.path.isfile(os.path.join(self.root, name, MANIFEST)):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest(self) -> Optional[int]:
        steps = self.committed_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: dict[str, Any]) -> str:
        final, partial = self.path(step), self.path(step) + ".partial"
        if os.path.exists(final):
            raise PhalanxError(f"checkpoint '{final}' already exists; phalanx never overwrites a saved checkpoint")
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            if os.path.exists(partial):  # left by a crash mid-save: incomplete, never loaded
                shutil.rmtree(partial)
        _barrier()
        start = time.perf_counter()
        shared = {k: v for k, v in state.items() if k not in self.rank_local_keys}
        local = {k: state[k] for k in self.rank_local_keys if k in state}
        dcp.save(shared, checkpoint_id=partial)
        torch.save(local, os.path.join(partial, f"rank-{self.rank}.pt"))
        _barrier()
        if self.rank == 0:
            manifest = {"step": step, "world_size": self.world_size, "time": time.time(),
                        "save_seconds": time.perf_counter() - start}
            with open(os.path.join(partial, MANIFEST), "w") as f:
                json.dump(manifest, f)
            os.replace(partial, final)
            self._apply_retention()
        _barrier()
        return final

    def load(self, step: int, state: dict[str, Any]) -> dict[str, Any]:
        """Fill `state` (a template with the same keys as saved) from checkpoint `step`, in place."""
        path = self.path(step)
        shared = {k: v for k, v in state.items() if k not in self.rank_local_keys}
        dcp.load(shared, checkpoint_id=path)
        state.update(shared)
        local_file = os.path.join(path, f"rank-{self.rank}.pt")
        if os.path.exists(local_file):
            state.update(torch.load(local_file, weights_only=False))
        else:
            for key in self.rank_local_keys:
                state.pop(key, None)  # saved with another world size: this rank keeps its fresh RNG
        return state

    def _apply_retention(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.committed_steps()[: -self.keep_last]:
            shutil.rmtree(self.path(old), ignore_errors=True)
