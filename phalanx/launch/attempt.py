"""An attempt's Ray resources: a placement group of one bundle per worker, a keeper actor on each node
it spans, and a `TrainWorker` per bundle running one rank of `phalanx train` (rendezvous at rank 0's
node). Survivors of the last attempt are reused and missing workers come from the warm spares."""

from __future__ import annotations

import os
from typing import Any, Optional

from phalanx.errors import PhalanxError
from phalanx.events import append_event
from phalanx.launch.standby import Standby


def newest_checkpoint(cfg: Any, run_dir: str) -> str:
    """Where a user resumes from: the newest verified persisted checkpoint, or that there is none."""
    from phalanx.checkpoint.link import run_secret
    from phalanx.checkpoint.persistent import CheckpointStore
    from phalanx.checkpoint.signing import signing_key

    c = cfg.checkpoint
    key = signing_key(run_secret(run_dir, c.key_file)) if c.sign else None
    store = CheckpointStore(c.storage or os.path.join(run_dir, "checkpoints"), key=key, run_hint=run_dir)
    newest = store.newest_valid(lambda step, problem: None)
    return (f"the newest usable checkpoint is {store.path(newest)}" if newest is not None
            else "no persisted checkpoint exists yet")


class NoRoom(PhalanxError):
    """Ray cannot place an attempt's workers within the time allowed."""


def keep_nodes(bundle_nodes: list[str], previous: list[str]) -> list[int]:
    """The bundle of each rank: one on the node the rank had in the last attempt when the new placement
    has one there (its keeper holds the rank's snapshots, restored from memory at no network cost), else
    the free bundles in order. `previous`: the Ray node of each rank ([]: the first attempt)."""
    free = list(range(len(bundle_nodes)))
    bundles: list[Optional[int]] = [None] * len(bundle_nodes)
    for rank, node_id in enumerate(previous[: len(bundle_nodes)]):
        same = next((b for b in free if bundle_nodes[b] == node_id), None)
        if same is not None:
            bundles[rank] = same
            free.remove(same)
    return [b if b is not None else free.pop(0) for b in bundles]


class AttemptLauncher:
    """Places and starts the workers of each attempt; holds the node keepers between attempts."""

    def __init__(self, cfg: Any, config_path: str, overrides: list[str], workers: int, run_dir: str):
        self.cfg, self.config_path, self.overrides, self.workers, self.run_dir = cfg, config_path, overrides, workers, run_dir
        self.layout_overrides: list[str] = []  # an elastic run's layout for fewer workers (elastic.py)
        self.node_index: dict[str, int] = {}
        self.keepers: dict[int, Any] = {}  # node index -> KeeperActor
        self.standby = Standby()  # a warm spare worker per node replaces a failed rank
        self.placed: tuple[Any, list[str]] = (None, [])  # the current attempt's placement group and nodes

    def resize(self, workers: int, layout_overrides: list[str]) -> None:
        """The next attempts run `workers` workers with `layout_overrides` on top of the run's own."""
        self.workers, self.layout_overrides = workers, list(layout_overrides)

    def place(self, previous: list[str], timeout_s: Optional[float] = None) -> tuple[Any, list[str], list[int]]:
        """A placement group of one bundle per worker (spread over the nodes), the Ray node of each rank and
        its bundle: ranks stay on the nodes they had (`previous`, `keep_nodes`) where the group has room.
        NoRoom when Ray cannot place them within `timeout_s` (default fault.wait_for_nodes_s)."""
        import ray
        from ray.util.placement_group import placement_group, placement_group_table

        gpus = ray.cluster_resources().get("GPU", 0) >= self.workers
        bundle = {"GPU": 1, "CPU": 1} if gpus else {"CPU": 1}
        pg = placement_group([dict(bundle) for _ in range(self.workers)], strategy="SPREAD")
        wait = self.cfg.fault.wait_for_nodes_s if timeout_s is None else timeout_s
        ready, _ = ray.wait([pg.ready()], timeout=max(wait, 1.0))
        if not ready:
            ray.util.remove_placement_group(pg)
            elastic = "" if self.cfg.fault.elastic else ", or set fault.elastic=true to go on with fewer"
            raise NoRoom(f"Ray cannot place {self.workers} workers ({bundle} each) within {wait:.0f}s "
                         f"(fault.wait_for_nodes_s); {newest_checkpoint(self.cfg, self.run_dir)}; add nodes or "
                         f"lower --workers{elastic}")
        nodes = placement_group_table(pg)["bundles_to_node_id"]
        bundles = keep_nodes([nodes[i] for i in range(self.workers)], previous)
        return pg, [nodes[b] for b in bundles], bundles

    def keeper(self, node_id: str, node: int, warm: bool) -> None:
        """A keeper actor on Ray node `node_id` for node index `node`, unless one there answers; `warm`: it
        loads the persistent tier at once (`keeper.persists_while_training`)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from phalanx.checkpoint.link import run_identity
        from phalanx.launch.actors import KeeperActor

        actor = self.keepers.get(node)
        if actor is not None:
            try:
                ray.get(actor.ping.remote(), timeout=10)
                return
            except Exception:
                pass
        c = self.cfg.checkpoint
        run_id, secret = run_identity(self.run_dir, c.key_file)
        self.keepers[node] = KeeperActor.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(
            run_id, node, secret.hex(), c.keeper_host, c.keeper_dir, warm)
        ray.get(self.keepers[node].ping.remote(), timeout=60)

    def warm_spares(self) -> None:
        """Spares for the current attempt's nodes (`Standby.replenish`), once it trains."""
        pg, node_ids = self.placed
        if pg is not None:
            self.standby.replenish(pg, node_ids)

    def drain_keepers(self, timeout_s: float) -> None:
        """Before the run gives up: the persistent writes the keepers have in hand finish (at most
        `timeout_s`), so the newest checkpoint a user is told of is not lost when the keepers go."""
        import ray

        calls = [keeper.drain.remote(timeout_s) for keeper in self.keepers.values()]
        if calls:
            ray.wait(calls, num_returns=len(calls), timeout=timeout_s + 5.0)

    @staticmethod
    def _alive(workers: list[Optional[Any]]) -> list[Optional[Any]]:
        """The survivors kept from the last attempt that still answer; a process that died since (its run's
        teardown can crash after the controller's last look at it) leaves its slot to a spare or a new worker."""
        import ray

        from phalanx.launch.actors import kill

        calls = {i: w.where.remote() for i, w in enumerate(workers) if w is not None}
        answered, _ = ray.wait(list(calls.values()), num_returns=len(calls), timeout=10.0) if calls else ([], [])
        kept = list(workers)
        for i, call in calls.items():
            try:
                alive = call in answered and ray.get(call, timeout=1.0) is not None
            except Exception:  # its actor died
                alive = False
            if not alive:
                kill(workers[i])
                kept[i] = None
        return kept

    def start(self, attempt: int, pg: Any, node_ids: list[str], bundles: list[int], workers: list[Optional[Any]]
               ) -> tuple[list[Any], list[int], list[Any]]:
        """Keepers on every node, a worker in every bundle (survivors of the last attempt are reused:
        their processes have torch imported and cost no start), then every rank's `phalanx train`."""
        import ray

        from phalanx.checkpoint.keeper import persists_while_training
        from phalanx.launch.actors import node_index_of

        ray_nodes = [node_index_of(n, self.node_index) for n in node_ids]
        # checkpoint.simulate_nodes: contiguous rank blocks are the nodes (the trainers' snapshot engines
        # agree, see checkpoint/collectives.node_ids), each with its own keeper, lost together by a `node` fault
        simulate = self.cfg.checkpoint.simulate_nodes
        nodes = [rank * simulate // self.workers for rank in range(self.workers)] if simulate else ray_nodes
        warm = persists_while_training(self.cfg)
        for node in sorted(set(nodes)):
            self.keeper(node_ids[nodes.index(node)], node, warm)
        workers = self.standby.fill(self._alive(workers), pg, node_ids, bundles)
        self.placed = (pg, list(node_ids))
        master_ip = ray.get(workers[0].where.remote(), timeout=120)[1]
        port = ray.get(workers[0].free_port.remote(), timeout=60)
        overrides = [*self.overrides, *self.layout_overrides, f"run.name={os.path.basename(self.run_dir)}",
                     f"run.dir={os.path.dirname(self.run_dir)}", "run.resume=true"]
        futures = []
        for rank, worker in enumerate(workers):
            local = ray_nodes[:rank].count(ray_nodes[rank])
            env = {"RANK": str(rank), "WORLD_SIZE": str(self.workers), "LOCAL_RANK": str(local),
                   "LOCAL_WORLD_SIZE": str(ray_nodes.count(ray_nodes[rank])), "MASTER_ADDR": master_ip,
                   "MASTER_PORT": str(port), "PHALANX_NODE": str(nodes[rank]), "PHALANX_RUN_LOCK_HELD_BY": "ray",
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            for name in ("GLOO_SOCKET_IFNAME", "PHALANX_RUN_SECRET"):  # the secret: rank 0 must read the keepers'
                if name in os.environ:
                    env[name] = os.environ[name]
            futures.append(worker.run.remote(self.config_path, overrides, env))
        append_event(self.run_dir, "workers", attempt=attempt, nodes=nodes, node_ids=node_ids)
        print(f"phalanx ray: attempt {attempt}: {self.workers} workers on nodes {nodes}", flush=True)
        return workers, nodes, futures
