"""Warm spare workers: a failed rank's replacement that has already imported torch and phalanx.

Most of a replacement's start is not Ray's: it is the new process importing torch and the trainer
(benchmarks/recovery.py times both). So the controller keeps one spare `TrainWorker` per node, started
with its imports done in the background once the attempt trains, and a failed rank's bundle gets its node's
spare instead of a new process.
The spare runs beside the placement group (no resources of its own): only on CPU bundles, since a
GPU worker's device comes with its bundle, and a spare holding a GPU would idle one.
"""

from __future__ import annotations

import os
from typing import Any, Optional


class Standby:
    """One warm spare per node of the run (CPU bundles only); `fill` hands them out."""

    def __init__(self) -> None:
        self.spares: dict[str, Any] = {}  # Ray node id -> warm TrainWorker

    def fill(self, workers: list[Optional[Any]], pg: Any, node_ids: list[str], bundles: list[int]) -> list[Any]:
        """`workers` with every empty slot filled: the node's spare when it is alive, else a new worker in
        the slot's bundle (`bundles[i]`, on node `node_ids[i]`)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from phalanx.launch.actors import TrainWorker

        filled = []
        for i, worker in enumerate(workers):
            if worker is None:
                worker = self._take(node_ids[i])
            if worker is None:
                worker = TrainWorker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, bundles[i])).remote()
            filled.append(worker)
        return filled

    def replenish(self, pg: Any, node_ids: list[str]) -> None:
        """A new spare warming on every node of `node_ids` that has none (CPU bundles only). The controller
        calls it once an attempt has trained a step: a spare importing torch beside workers that import
        it too would slow their start, on a node with few cores."""
        if not any(spec.get("GPU") for spec in pg.bundle_specs):
            for node_id in sorted(set(node_ids) - set(self.spares)):
                self.spares[node_id] = self._spare(node_id)

    def _take(self, node_id: str) -> Optional[Any]:
        import ray

        spare = self.spares.pop(node_id, None)
        if spare is None:
            return None
        try:  # a spare on a lost node is gone with it
            ray.get(spare.where.remote(), timeout=5)
            return spare
        except Exception:
            return None

    @staticmethod
    def _spare(node_id: str) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from phalanx.launch.actors import TrainWorker

        spare = TrainWorker.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id, soft=False)).remote()
        # The thread count a rank's torch starts with is the one `run` would give a new worker.
        spare.warm.remote({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        return spare

    def close(self) -> None:
        from phalanx.launch.actors import kill

        for spare in self.spares.values():
            kill(spare)
        self.spares.clear()
