"""`phalanx ray`: one Ray controller drives every worker of a run, detects failures and recovers.

Per attempt: a placement group of one bundle per worker, a keeper actor on each node it spans, one
`TrainWorker` per bundle running a rank of `phalanx train` (rendezvous at rank 0's node). Every
`fault.heartbeat_s` the controller asks each worker where it is (`telemetry/health.py`) and checks the nodes.
It detects (a) a dead worker, (b) a lost node (its keeper gone), (c) a hang — a collective older than
`fault.collective_timeout_s`, naming the ranks that never entered it — and (d) stragglers (a warning).
On a failure it stops every worker, starts replacements (the placement group is made again, so a lost
node's bundles land where there is room, waiting at most `fault.wait_for_nodes_s`) and the trainers
restore by themselves from keeper memory, peers or storage. Each recovery is one `recovery` event in
`events.jsonl` with its downtime split into detect / restart / restore / first step.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Optional

from phalanx.errors import PhalanxError
from phalanx.events import append_event, read_events
from phalanx.faults import fired, parse_injection
from phalanx.launch.standby import Standby
from phalanx.launch.timeline import timeline
from phalanx.launch.watchdog import find_hang, find_stragglers


def _done(future: Any) -> bool:
    import ray

    return bool(ray.wait([future], timeout=0)[0])


def _error_line(err: Exception) -> str:
    """The line of a worker's traceback that says what went wrong (the last `...Error: ...` line; torch
    appends `At:` frames after it), at most 300 characters."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    said = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b.*:", line)]
    return (said or lines or [repr(err)])[-1][:300]


def _events(run_dir: str, after: float) -> list[dict[str, Any]]:
    return read_events(run_dir, since=after)


class Failure(Exception):
    def __init__(self, cause: str, ranks: list[int], nodes: list[int], failed_at: float, detail: str = ""):
        super().__init__(f"{cause}: rank(s) {ranks} on node(s) {nodes}" + (f" — {detail}" if detail else ""))
        self.cause, self.ranks, self.nodes, self.failed_at, self.detail = cause, ranks, nodes, failed_at, detail
        self.detected_at = time.time()


class Controller:
    def __init__(self, cfg: Any, config_path: str, overrides: list[str], workers: int, run_dir: str):
        self.cfg, self.config_path, self.overrides, self.workers, self.run_dir = cfg, config_path, overrides, workers, run_dir
        self.fault = cfg.fault
        self.node_index: dict[str, int] = {}
        self.keepers: dict[int, Any] = {}  # node index -> KeeperActor
        self.standby = Standby()  # a warm spare worker per node replaces a failed rank
        self.node_injections = [i for i in map(parse_injection, cfg.fault.inject) if i.kind == "node"]
        self.straggling: set[int] = set()
        self.node_ids: list[str] = []  # Ray node of each rank in the current attempt
        self.lost_nodes: set[int] = set()  # nodes whose keeper and workers an injected node loss killed
        self.reached = 0  # the newest step any worker reported (steps after the restored one are lost)

    # ---- one attempt -------------------------------------------------------------------------

    def _placement(self) -> tuple[Any, list[str]]:
        import ray
        from ray.util.placement_group import placement_group, placement_group_table

        gpus = ray.cluster_resources().get("GPU", 0) >= self.workers
        bundle = {"GPU": 1, "CPU": 1} if gpus else {"CPU": 1}
        pg = placement_group([dict(bundle) for _ in range(self.workers)], strategy="SPREAD")
        ready, _ = ray.wait([pg.ready()], timeout=max(self.fault.wait_for_nodes_s, 1.0))
        if not ready:
            ray.util.remove_placement_group(pg)
            raise PhalanxError(f"Ray cannot place {self.workers} workers ({bundle} each) within "
                               f"fault.wait_for_nodes_s={self.fault.wait_for_nodes_s:.0f}s; "
                               f"{self._newest_checkpoint()}; add nodes or lower --workers")
        nodes = placement_group_table(pg)["bundles_to_node_id"]
        return pg, [nodes[i] for i in range(self.workers)]

    def _keeper(self, node_id: str, node: int) -> None:
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
            run_id, node, secret.hex(), c.keeper_host, c.keeper_dir,
            c.keeper_linger_s)
        ray.get(self.keepers[node].ping.remote(), timeout=60)

    def _start(self, attempt: int, pg: Any, node_ids: list[str], workers: list[Optional[Any]]
               ) -> tuple[list[Any], list[int], list[Any]]:
        """Keepers on every node, a worker in every bundle (survivors of the last attempt are reused:
        their processes have torch imported and cost no start), then every rank's `phalanx train`."""
        import ray

        from phalanx.launch.actors import node_index_of

        ray_nodes = [node_index_of(n, self.node_index) for n in node_ids]
        # checkpoint.simulate_nodes: contiguous rank blocks are the nodes (the trainers' snapshot engines
        # agree, see node_ids in snapshot.py), each with its own keeper, lost together by a `node` fault
        simulate = self.cfg.checkpoint.simulate_nodes
        nodes = [rank * simulate // self.workers for rank in range(self.workers)] if simulate else ray_nodes
        self.node_ids, self.lost_nodes = list(node_ids), set()
        for node in sorted(set(nodes)):
            self._keeper(node_ids[nodes.index(node)], node)
        workers = self.standby.fill(workers, pg, node_ids)
        master_ip = ray.get(workers[0].where.remote(), timeout=120)[1]
        port = ray.get(workers[0].free_port.remote(), timeout=60)
        overrides = [*self.overrides, f"run.name={os.path.basename(self.run_dir)}",
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

    def _survivors(self, workers: list[Any], futures: list[Any], failure: "Failure") -> list[Optional[Any]]:
        """Workers worth keeping for the next attempt: not failed, and their run ended (a peer's death
        ends it within seconds); the rest are killed."""
        import ray

        from phalanx.launch.actors import kill

        keep: list[Optional[Any]] = list(workers)
        # DeepSpeed keeps process-wide state (its process groups) that a second run in the same process
        # trips over ("Group ... is not registered"): ZeRO ranks always restart in fresh processes.
        if failure.cause == "lost node" or self.cfg.parallel.dp_backend == "zero":
            keep = [None] * len(workers)
        for rank in failure.ranks:  # first: a hung rank's peers wait in a collective with it until it goes
            keep[rank] = None
            kill(workers[rank])
        others = [futures[r] for r in range(len(workers)) if keep[r] is not None]
        done, _ = ray.wait(others, timeout=10.0, num_returns=len(others)) if others else ([], [])
        # The survivors' last heartbeats: the newest step any rank completed (the failed rank had done no
        # more; the watch loop's last poll may predate it), from which `steps_lost` counts.
        calls = {r: workers[r].heartbeat.remote() for r in range(len(workers)) if r not in failure.ranks}
        answered, _ = ray.wait(list(calls.values()), timeout=2.0, num_returns=len(calls)) if calls else ([], [])
        alive = set()
        for rank, call in calls.items():
            try:
                if call in answered:
                    self.reached = max(self.reached, ray.get(call)["step"])
                    alive.add(rank)
            except Exception:  # its actor is gone
                pass
        for rank, worker in enumerate(workers):
            if keep[rank] is not None and futures[rank] in done and rank in alive:
                continue
            kill(worker)
            keep[rank] = None
        return keep

    def _watch(self, workers: list[Any], nodes: list[int], futures: list[Any],
               recovering: Optional[tuple[Failure, int]] = None) -> None:
        """Returns when every rank finished with 0; raises Failure otherwise. Every wait is bounded.
        `recovering` (the failure this attempt recovers from, the newest step reached before it) is
        written as a recovery event once the relaunched run's first step is done; a failure before that
        (during the recovery) is detected like any other."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        from phalanx.launch.actors import kill

        beats: dict[int, dict[str, Any]] = {}
        last_seen = {rank: time.time() for rank in range(len(workers))}
        pending = dict(enumerate(futures))
        while True:
            done, _ = ray.wait(list(pending.values()), timeout=self.fault.heartbeat_s, num_returns=len(pending))
            if recovering is not None and self._record_recovery(*recovering):
                recovering = None
            for rank, future in list(pending.items()):
                if future not in done:
                    continue
                del pending[rank]
                try:
                    code = ray.get(future)
                except RayActorError:
                    raise self._dead_failure([rank], nodes, last_seen) from None
                except Exception as err:  # the trainer raised: a peer's death, or a real error
                    hang = (find_hang(beats, time.time(), self.fault.collective_timeout_s)
                            or self._timed_out(rank, err, workers, pending, beats))
                    if hang:
                        raise self._hang(hang, nodes) from None
                    dead = self._dead(pending, 2 * self.fault.heartbeat_s + 1.0)
                    if dead:  # the error was the peer's death reaching this rank
                        raise self._dead_failure(dead, nodes, last_seen) from None
                    raise Failure("worker error", [rank], [nodes[rank]], last_seen[rank], _error_line(err)) from None
                if code != 0:
                    raise Failure("worker exit", [rank], [nodes[rank]], last_seen[rank], f"exit code {code}")
            if not pending:  # a last look at the whole run's step times (a straggler to report)
                if recovering is not None:
                    self._record_recovery(*recovering)
                try:
                    final = ray.get([w.heartbeat.remote() for w in workers], timeout=10)
                    self._stragglers(dict(enumerate(final)), nodes)
                except (RayActorError, GetTimeoutError):
                    pass
                return
            for node, keeper in self.keepers.items():
                if node in nodes and not self._keeper_alive(keeper):  # the actor, not its server: a run's
                    # end releases the keeper but leaves the actor until the controller kills it
                    ranks = [r for r, n in enumerate(nodes) if n == node]
                    raise Failure("lost node", ranks, [node], max(last_seen[r] for r in ranks),
                                  "its keeper is gone")
            calls = {rank: workers[rank].heartbeat.remote() for rank in pending}
            for rank, call in calls.items():
                try:
                    beats[rank] = ray.get(call, timeout=max(5.0, 3 * self.fault.heartbeat_s))
                    last_seen[rank] = beats[rank]["time"]
                except (RayActorError, GetTimeoutError):
                    pass  # a dead actor shows in its run future; a busy one answers next time
            self.reached = max([self.reached, *(b["step"] for b in beats.values())])
            hang = find_hang(beats, time.time(), self.fault.collective_timeout_s)
            if hang:
                raise self._hang(hang, nodes)
            self._stragglers(beats, nodes)
            self._inject_node_loss(beats, workers, nodes, kill)

    def _dead_failure(self, dead: list[int], nodes: list[int], last_seen: dict[int, float]) -> "Failure":
        """A dead worker, or — when its node is gone from the cluster — a lost node with all its ranks."""
        from phalanx.launch.actors import alive_nodes

        alive = alive_nodes()
        lost = sorted({nodes[r] for r in dead if self.node_ids[r] not in alive or nodes[r] in self.lost_nodes})
        if lost:
            ranks = [r for r, n in enumerate(nodes) if n in lost]
            why = "its keeper and workers were killed" if set(lost) <= self.lost_nodes else "the node left the cluster"
            return Failure("lost node", ranks, lost, min(last_seen[r] for r in ranks), why)
        return Failure("dead worker", dead, sorted({nodes[r] for r in dead}), min(last_seen[r] for r in dead))

    def _timed_out(self, rank: int, err: Exception, workers: list[Any], pending: dict[int, Any],
                   beats: dict[int, dict[str, Any]]) -> Optional[dict[str, Any]]:
        """A hang that the rank's own collective timeout reported before a heartbeat showed it waiting
        (the process group's timeout is fault.collective_timeout_s too; under load it wins the race): the
        ranks still running that entered fewer collectives than this one never entered the one it timed
        out in."""
        import ray

        # gloo says "Timed out waiting ..." in the op that timed out, and "Application timeout caused pair
        # closure" in the ops that shared its connection
        if not re.search(r"timed out|timeout", str(err), re.IGNORECASE):
            return None
        running = [r for r in pending if not _done(pending[r])]  # a rank that failed itself is no culprit
        fresh = dict(beats)
        for r in [rank, *running]:
            try:
                fresh[r] = ray.get(workers[r].heartbeat.remote(), timeout=5)
            except Exception:
                pass
        if rank not in fresh:
            return None
        seq = fresh[rank]["seq"]
        culprits = sorted(r for r in running if r in fresh and fresh[r]["seq"] < seq)
        if not culprits:
            return None
        name = (beats.get(rank, {}).get("in_collective") or {}).get("name", "a collective")
        return {"collective": name, "seq": seq, "waiting": [rank], "culprits": culprits,
                "where": {r: {"step": fresh[r]["step"], "phase": fresh[r]["phase"], "seq": fresh[r]["seq"]}
                          for r in culprits}}

    @staticmethod
    def _dead(pending: dict[int, Any], timeout: float) -> list[int]:
        """Ranks among `pending` whose actor died (their run futures fail with RayActorError)."""
        import ray
        from ray.exceptions import RayActorError

        done, _ = ray.wait(list(pending.values()), timeout=timeout, num_returns=len(pending)) if pending else ([], [])
        dead = []
        for rank, future in pending.items():
            if future in done:
                try:
                    ray.get(future)
                except RayActorError:
                    dead.append(rank)
                except Exception:
                    pass
        return sorted(dead)

    def _keeper_alive(self, keeper: Any) -> bool:
        import ray

        try:
            ray.get(keeper.alive.remote(), timeout=max(5.0, 3 * self.fault.heartbeat_s))
            return True
        except Exception:
            return False

    def _hang(self, hang: dict[str, Any], nodes: list[int]) -> Failure:
        where = "; ".join(f"rank {r} at step {w['step']} in {w['phase']} after collective #{w['seq']}"
                          for r, w in hang["where"].items())
        detail = (f"ranks {hang['waiting']} waited in {hang['collective']} #{hang['seq']} longer than "
                  f"fault.collective_timeout_s={self.fault.collective_timeout_s:.0f}s; never entered it: {where}")
        entered = time.time() - self.fault.collective_timeout_s  # the stuck collective began before this
        return Failure("hang", hang["culprits"], sorted({nodes[r] for r in hang["culprits"]}), entered, detail)

    def _stragglers(self, beats: dict[int, dict[str, Any]], nodes: list[int]) -> None:
        for s in find_stragglers(beats, self.fault.straggler_factor, self.fault.straggler_steps):
            if s["rank"] not in self.straggling:
                self.straggling.add(s["rank"])
                append_event(self.run_dir, "straggler", rank=s["rank"], node=nodes[s["rank"]], busy_s=s["busy_s"],
                             median_busy_s=s["median_busy_s"], steps=s["steps"])
                print(f"phalanx ray: straggler: rank {s['rank']} (node {nodes[s['rank']]}) busy "
                      f"{s['busy_s']:.3f}s per step vs median {s['median_busy_s']:.3f}s", flush=True)

    def _inject_node_loss(self, beats: dict[int, dict[str, Any]], workers: list[Any], nodes: list[int],
                          kill: Any) -> None:
        step = max((b["step"] for b in beats.values()), default=0)
        done = fired(self.run_dir)
        for injection in self.node_injections:
            if injection.spec in done or step < injection.step or injection.node not in nodes:
                continue
            append_event(self.run_dir, "fault_injected", spec=injection.spec, kind="node", node=injection.node,
                         step=step)
            self.lost_nodes.add(injection.node)
            kill(self.keepers.pop(injection.node, None))
            for rank, node in enumerate(nodes):
                if node == injection.node:
                    kill(workers[rank])

    # ---- the run -----------------------------------------------------------------------------

    def _newest_checkpoint(self) -> str:
        from phalanx.checkpoint.link import run_secret
        from phalanx.checkpoint.persistent import CheckpointStore
        from phalanx.checkpoint.signing import signing_key

        c = self.cfg.checkpoint
        key = signing_key(run_secret(self.run_dir, c.key_file)) if c.sign else None
        store = CheckpointStore(c.storage or os.path.join(self.run_dir, "checkpoints"), key=key, run_hint=self.run_dir)
        newest = store.newest_valid(lambda step, problem: None)
        return (f"the newest usable checkpoint is {store.path(newest)}" if newest is not None
                else "no persisted checkpoint exists yet")

    def run(self) -> int:
        import ray

        from phalanx.launch.actors import alive_nodes, kill

        restarts, failure, last_step = 0, None, 0
        pg, node_ids = None, []
        workers: list[Optional[Any]] = [None] * self.workers
        launched = time.time()
        try:
            while True:
                futures: list[Any] = []
                try:
                    if pg is not None and not set(node_ids) <= alive_nodes():
                        ray.util.remove_placement_group(pg)  # bundles on a dead node: place again
                        pg, workers = None, [None] * self.workers
                    if pg is None:
                        pg, node_ids = self._placement()
                    workers, nodes, futures = self._start(restarts, pg, node_ids, workers)
                    self._watch(workers, nodes, futures, None if failure is None else (failure, last_step))
                    append_event(self.run_dir, "controller_done", restarts=restarts)
                    print(f"phalanx ray: finished after {restarts} recoveries", flush=True)
                    return 0
                except Failure as caught:
                    failure = caught
                    append_event(self.run_dir, "failure", cause=failure.cause, ranks=failure.ranks,
                                 nodes=failure.nodes, failed_at=failure.failed_at, detected_at=failure.detected_at,
                                 detail=failure.detail)
                    print(f"phalanx ray: {failure}", flush=True)
                    workers = self._survivors(workers, futures, failure)
                    last_step = self.reached
                if restarts >= self.fault.max_restarts:
                    message = (f"giving up after fault.max_restarts={self.fault.max_restarts} recoveries "
                               f"(last: {failure}); {self._newest_checkpoint()}")
                    append_event(self.run_dir, "gave_up", restarts=restarts, message=message)
                    raise PhalanxError(message)
                restarts += 1
        finally:
            for actor in [*workers, *self.keepers.values()]:
                kill(actor)
            self.standby.close()
            if pg is not None:
                ray.util.remove_placement_group(pg)
            lines = timeline(self.run_dir, launched)
            if len(lines) > 1:
                print("\n".join(lines), flush=True)

    def _record_recovery(self, failure: Failure, last_step: int) -> bool:
        """Writes the recovery event once the relaunched run's restore and first step are in events.jsonl;
        False while they are not (yet)."""
        restore = first = None
        for event in _events(self.run_dir, failure.detected_at):
            if event["event"] == "restore" and restore is None:
                restore = event
            if event["event"] == "first_step":
                first = event
        if first is None:
            return False
        restore_end = restore["time"] if restore else first["time"]
        restore_s = restore["seconds"] if restore else 0.0
        restored_step = restore["step"] if restore else 0
        event = {
            "cause": failure.cause, "ranks": failure.ranks, "nodes": failure.nodes, "detail": failure.detail,
            "failed_at": failure.failed_at, "detected_at": failure.detected_at,
            "restored_from": restore["restored_from"] if restore else "none (fresh start)",
            "step": restored_step, "steps_lost": max(0, last_step - restored_step),
            "detect_s": failure.detected_at - failure.failed_at,
            "restart_s": max(0.0, restore_end - restore_s - failure.detected_at),
            "restore_s": restore_s, "first_step_s": first["time"] - restore_end,
            "downtime_s": first["time"] - failure.failed_at,
        }
        append_event(self.run_dir, "recovery", **event)
        print(f"phalanx ray: recovered from {failure.cause} (ranks {failure.ranks}) from {event['restored_from']} "
              f"at step {restored_step}: downtime {event['downtime_s']:.2f}s (detect {event['detect_s']:.2f} + "
              f"restart {event['restart_s']:.2f} + restore {event['restore_s']:.2f} + first step "
              f"{event['first_step_s']:.2f}), steps lost {event['steps_lost']}", flush=True)
        return True


def loopback_only() -> None:
    """Makes Ray, in this process and the processes it starts, bind and advertise 127.0.0.1 only.

    `_node_ip_address="127.0.0.1"` alone is not enough: Ray replaces a loopback address by the host's
    routable one (`services.resolve_ip_for_localhost`); measured with ray 2.60 on a host with eth0
    192.0.2.2, GCS and raylet advertised 192.0.2.2 and listened on 0.0.0.0 / ::. In Ray's single-machine
    mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, its default on macOS and Windows) every process binds and
    advertises 127.0.0.1 (tests/helpers.py assert_loopback_only checks every socket)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read at import by Ray's own processes
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # this process may have imported ray before the variable was set


def start_local_ray(**options: Any) -> None:
    """A new local Ray instance on loopback only, without the dashboard. `address="local"` starts one
    instead of joining the instance that `ray start` (or a test's `Cluster`) last recorded in /tmp/ray."""
    import ray

    loopback_only()
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **options)


def connect(address: Optional[str], workers: int = 1) -> None:
    """Join a running cluster (`--address`, or RAY_ADDRESS as under `ray job submit`), else start a
    local one on loopback without the dashboard, with a CPU slot for each of `workers` (more workers than
    cores share them, as under torchrun, instead of waiting for slots that never come)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        start_local_ray(log_to_driver=True, num_cpus=max(os.cpu_count() or 1, workers))


def main(config_path: str, overrides: list[str], workers: int, address: Optional[str]) -> int:
    from phalanx.config import load_config
    from phalanx.parallel import validate
    from phalanx.trainer.rundir import prepare_run_dir

    cfg = validate(load_config(config_path, overrides), workers)
    run_dir, messages = prepare_run_dir(cfg)
    for message in messages:
        print(message, flush=True)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo") if not (address or os.environ.get("RAY_ADDRESS")) else None
    connect(address, workers)
    return Controller(cfg, os.path.abspath(config_path), overrides, workers, run_dir).run()

