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

The controller only acts: what failed is judged by `failures.classify_failure` from the facts it
gathers, the recovery's accounting is `recovery.recovery_record`, and Ray is joined or started by
`ray_setup`.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any, Optional

from phalanx.errors import ConfigError, PhalanxError
from phalanx.events import append_event, read_events
from phalanx.faults import RandomClock, fired, parse_faults
from phalanx.launch.attempt import AttemptLauncher, NoRoom, newest_checkpoint
from phalanx.launch.failures import Failure, RankEnd, Reports, classify_failure, next_question
from phalanx.launch.ray_setup import connect
from phalanx.launch.recovery import recovery_line, recovery_record
from phalanx.launch.timeline import timeline
from phalanx.launch.watchdog import find_stragglers


def _done(future: Any) -> bool:
    import ray

    return bool(ray.wait([future], timeout=0)[0])


def _settle(futures: list[Any]) -> None:
    """Take the ends of an attempt's runs (the failure is judged already; a stopped rank's error is its
    echo), so Ray does not print each unread one as an 'Unhandled error' traceback later."""
    import ray

    done, _ = ray.wait(futures, num_returns=len(futures), timeout=2.0) if futures else ([], [])
    for future in done:
        try:
            ray.get(future)
        except Exception:  # read to be settled, not judged
            pass


def _rank_end(rank: int, future: Any) -> RankEnd:
    """How the run of `rank` ended, from its finished future."""
    import ray
    from ray.exceptions import RayActorError

    try:
        code, message = ray.get(future)
    except RayActorError:
        return RankEnd(rank, died=True)
    except Exception as err:  # the trainer raised: a peer's death, or a real error
        return RankEnd(rank, error=str(err).strip() or repr(err))
    return RankEnd(rank, code=code, message=message)


class Controller:
    """Runs attempts until one finishes: starts them (`AttemptLauncher`), watches them, and on a failure
    keeps the survivors and starts again, at most fault.max_restarts times."""

    def __init__(self, cfg: Any, config_path: str, overrides: list[str], workers: int, run_dir: str):
        from phalanx.parallel.layout import Layout

        self.cfg, self.fault, self.workers, self.run_dir = cfg, cfg.fault, workers, run_dir
        self.attempts = AttemptLauncher(cfg, config_path, overrides, workers, run_dir)
        self.keepers = self.attempts.keepers  # node index -> KeeperActor
        injections, randoms = parse_faults(cfg.fault.inject)
        self.node_injections = [i for i in injections if i.kind == "node"]
        self.random: Optional[RandomClock] = None  # a random schedule of kills and node losses, fired from here
        if randoms is not None:
            done = sum(e.get("spec") == randoms.spec for e in read_events(run_dir, kinds={"fault_injected"}))
            self.random = RandomClock(randoms, done)
        self.straggling: set[int] = set()
        self.node_ids: list[str] = []  # Ray node of each rank in the current attempt
        self.lost_nodes: set[int] = set()  # nodes whose keeper and workers an injected node loss killed
        self.reached = 0  # the newest step any worker reported (steps after the restored one are lost)
        self.target = workers  # --workers: an elastic run that shrank grows back to it
        self.own_layout = self.layout = Layout.from_config(cfg, workers).name()  # the run's, and the current one
        self.resizing: Optional[dict[str, Any]] = None  # the resize the current attempt makes, until recorded

    # ---- one attempt -------------------------------------------------------------------------

    def _survivors(self, workers: list[Any], futures: list[Any], failure: "Failure") -> list[Optional[Any]]:
        """Workers worth keeping for the next attempt: not failed, and their run ended (a peer's death
        ends it within seconds); the rest are killed."""
        import ray

        from phalanx.launch.actors import kill

        keep: list[Optional[Any]] = list(workers)
        # DeepSpeed keeps process-wide state (its process groups) that a second run in the same process
        # trips over ("Group ... is not registered"): ZeRO ranks always restart in fresh processes.
        if failure.cause in ("lost node", "grow") or self.cfg.parallel.dp_backend == "zero":
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
        _settle(futures)
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
        warmed = False  # spares start warming once a step is done
        while True:
            done, _ = ray.wait(list(pending.values()), timeout=self.fault.heartbeat_s, num_returns=len(pending))
            if recovering is not None and self._record_recovery(*recovering):
                recovering = None
            for rank, future in list(pending.items()):
                if future not in done:
                    continue
                del pending[rank]
                failure = self._judge(self._reports(nodes, last_seen, beats, ended=_rank_end(rank, future)),
                                      workers, pending)
                if failure is not None:
                    raise failure
            if not pending:  # a last look at the whole run's step times (a straggler to report)
                if recovering is not None:
                    self._record_recovery(*recovering)
                try:
                    final = ray.get([w.heartbeat.remote() for w in workers], timeout=10)
                    self._stragglers(dict(enumerate(final)), nodes)
                except (RayActorError, GetTimeoutError):
                    pass
                return
            # the actor, not its server: a run's end releases the keeper but leaves the actor until the
            # controller kills it
            gone = next((node for node, keeper in self.keepers.items()
                         if node in nodes and not self._keeper_alive(keeper)), None)
            if gone is not None:
                raise classify_failure(self._reports(nodes, last_seen, beats, keeper_gone=gone))
            calls = {rank: workers[rank].heartbeat.remote() for rank in pending}
            for rank, call in calls.items():
                try:
                    beats[rank] = ray.get(call, timeout=max(5.0, 3 * self.fault.heartbeat_s))
                    last_seen[rank] = beats[rank]["time"]
                except (RayActorError, GetTimeoutError):
                    pass  # a dead actor shows in its run future; a busy one answers next time
            self.reached = max([self.reached, *(b["step"] for b in beats.values())])
            if not warmed and any(b["step"] > 0 for b in beats.values()):  # this attempt trains
                self.attempts.warm_spares()
                warmed = True
            failure = classify_failure(self._reports(nodes, last_seen, beats))  # a hang
            if failure is not None:
                raise failure
            if recovering is None and self._room_to_grow(beats):
                raise Failure("grow", [], [], time.time(), detail=f"Ray has room for --workers={self.target} again")
            self._stragglers(beats, nodes)
            self._inject_node_loss(beats, workers, nodes, kill)
            self._inject_random(beats, workers, nodes, kill)

    def _room_to_grow(self, beats: dict[int, dict[str, Any]]) -> bool:
        """An elastic run below --workers whose attempt trains (its keepers hold a step of this layout), now
        that Ray has room for the workers it lacks."""
        import ray

        missing = self.target - self.attempts.workers
        if missing <= 0 or not any(b["step"] > 0 for b in beats.values()):
            return False
        kind = "GPU" if ray.cluster_resources().get("GPU", 0) >= self.target else "CPU"
        return ray.available_resources().get(kind, 0) >= missing

    def _place(self, previous: list[str], failure: Optional[Failure]) -> tuple[Any, list[str], list[int]]:
        """The attempt's placement; an elastic run that finds no room for its workers goes on with fewer."""
        try:
            return self.attempts.place(previous)
        except NoRoom:
            if not (self.fault.elastic and failure is not None):
                raise
        return self._shrink(previous, failure)

    def _shrink(self, previous: list[str], failure: Failure) -> tuple[Any, list[str], list[int]]:
        """The largest world (at least fault.min_workers) Ray can place now, on the layout the planner ranks
        best for it (`elastic.py`); the resize is recorded with the recovery that follows."""
        import ray

        from phalanx.launch.actors import alive_nodes
        from phalanx.launch.elastic import elastic_layout, no_layout_message

        start, before, overrides = time.time(), self.attempts.workers, self.attempts.layout_overrides
        device = "H100" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
        for world in range(before - 1, self.fault.min_workers - 1, -1):
            layout = elastic_layout(self.cfg, world, len(alive_nodes()), device)
            if layout is None:
                continue
            self.attempts.resize(world, layout.to_overrides())
            try:
                placed = self.attempts.place(previous, timeout_s=5.0)
            except NoRoom:
                continue
            self.resizing = {"cause": failure.cause, "from_layout": self.layout, "to_layout": layout.name(),
                             "from_workers": before, "to_workers": world, "replan_s": time.time() - start}
            self.layout = layout.name()
            print(f"phalanx ray: elastic: no room for {before} workers; going on with {world} as {layout.name()}",
                  flush=True)
            return placed
        self.attempts.resize(before, overrides)
        raise PhalanxError(f"{no_layout_message(self.cfg, self.fault.min_workers, before - 1)}; "
                           f"{newest_checkpoint(self.cfg, self.run_dir)}")

    def _grow(self, failure: Failure) -> None:
        """Back to --workers on the run's own layout (the placement waits fault.wait_for_nodes_s for room)."""
        self.resizing = {"cause": failure.cause, "from_layout": self.layout, "to_layout": self.own_layout,
                         "from_workers": self.attempts.workers, "to_workers": self.target, "replan_s": 0.0}
        self.attempts.resize(self.target, [])
        self.layout = self.own_layout

    def _reports(self, nodes: list[int], last_seen: dict[int, float], beats: dict[int, dict[str, Any]],
                 **facts: Any) -> Reports:
        return Reports(nodes=nodes, node_ids=self.node_ids, last_seen=last_seen,
                       timeout_s=self.fault.collective_timeout_s, now=time.time(), beats=beats,
                       lost_nodes=frozenset(self.lost_nodes), **facts)

    def _judge(self, reports: Reports, workers: list[Any], pending: dict[int, Any]) -> Optional[Failure]:
        """The failure of an ended rank, if any, after asking the facts the judgement needs."""
        while (question := next_question(reports)) is not None:
            reports = self._answer(question, reports, workers, pending)
        return classify_failure(replace(reports, detected_at=time.time()))

    def _answer(self, question: str, reports: Reports, workers: list[Any], pending: dict[int, Any]) -> Reports:
        """`reports` with the fact `next_question` asked for."""
        import ray

        from phalanx.launch.actors import alive_nodes

        if question == "fresh_beats":
            running = [r for r in pending if not _done(pending[r])]
            fresh = dict(reports.beats)
            for r in [reports.ended.rank, *running]:
                try:
                    fresh[r] = ray.get(workers[r].heartbeat.remote(), timeout=5)
                except Exception:
                    pass
            return replace(reports, running=running, fresh=fresh)
        if question == "dead":  # whether the error was a peer's death reaching this rank
            return replace(reports, dead=self._dead(pending, 2 * self.fault.heartbeat_s + 1.0))
        return replace(reports, alive_nodes=alive_nodes())

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
            self._lose_node(injection.node, workers, nodes, kill)

    def _lose_node(self, lost: int, workers: list[Any], nodes: list[int], kill: Any) -> None:
        """An injected node loss: the node's keeper (its snapshots) and workers die; the node stays in Ray."""
        self.lost_nodes.add(lost)
        kill(self.keepers.pop(lost, None))
        for rank, node in enumerate(nodes):
            if node == lost:
                kill(workers[rank])

    def _inject_random(self, beats: dict[int, dict[str, Any]], workers: list[Any], nodes: list[int],
                       kill: Any) -> None:
        """The random schedule's due faults (its clock starts at the first trained step) on this attempt's ranks
        and nodes, also while it recovers; between a failure and the next start they strike the survivors and
        keepers, which that start replaces (a rank with no process then has nothing to kill)."""
        if self.random is None or not nodes:
            return
        now = time.time()
        if any(b["step"] > 0 for b in beats.values()):
            self.random.start(now)
        for fault in self.random.due(now):
            where = {"rank": fault.victim(range(len(workers)))} if fault.kind == "kill" else \
                {"node": fault.victim(nodes)}
            append_event(self.run_dir, "fault_injected", spec=self.random.schedule.spec, kind=fault.kind,
                         step=self.reached, index=fault.index, at_s=fault.at_s, **where)
            if fault.kind == "kill":
                kill(workers[where["rank"]])
            else:
                self._lose_node(where["node"], workers, nodes, kill)

    # ---- the run -----------------------------------------------------------------------------

    def run(self) -> int:
        import ray

        from phalanx.launch.actors import alive_nodes, kill

        restarts, attempt, failure, last_step = 0, 0, None, 0
        pg, node_ids, bundles = None, [], []
        nodes: list[int] = []  # node index of each rank in the last attempt
        workers: list[Optional[Any]] = [None] * self.workers
        launched = time.time()
        append_event(self.run_dir, "launch", workers=self.workers)
        try:
            while True:
                futures: list[Any] = []
                try:
                    if pg is not None and (not set(node_ids) <= alive_nodes() or self.resizing is not None):
                        ray.util.remove_placement_group(pg)  # bundles on a dead node, or another world: place again
                        pg = None
                    if pg is None:
                        pg, node_ids, bundles = self._place(node_ids, failure)
                    if len(workers) != self.attempts.workers:  # resized: every rank starts afresh
                        for worker in workers:
                            kill(worker)
                        workers = [None] * self.attempts.workers
                    self.node_ids, self.lost_nodes = list(node_ids), set()
                    if len(nodes) == len(workers):  # faults due while recovering strike the survivors and keepers
                        self._inject_random({}, workers, nodes, kill)
                    try:
                        workers, nodes, futures = self.attempts.start(attempt, pg, node_ids, bundles, workers)
                    except ray.exceptions.RayActorError as err:  # a node Ray had not yet seen die held a bundle
                        raise Failure("lost node", [], [], time.time(), detail=f"an actor of attempt {attempt} died "
                                      f"as it started ({type(err).__name__}); placing again") from err
                    attempt += 1  # every start: recoveries and an elastic run's growth
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
                    if failure.cause == "grow":  # not a failure: no restart is spent on it
                        self._grow(failure)
                        continue
                if restarts >= self.fault.max_restarts:
                    self.attempts.drain_keepers(self.fault.collective_timeout_s)
                    message = (f"giving up after fault.max_restarts={self.fault.max_restarts} recoveries "
                               f"(last: {failure}); {newest_checkpoint(self.cfg, self.run_dir)}")
                    append_event(self.run_dir, "gave_up", restarts=restarts, message=message)
                    raise PhalanxError(message)
                restarts += 1
        finally:
            for actor in [*workers, *self.keepers.values()]:
                kill(actor)
            self.attempts.standby.close()
            if pg is not None:
                ray.util.remove_placement_group(pg)
            lines = timeline(self.run_dir, launched)
            if len(lines) > 1:
                print("\n".join(lines), flush=True)

    def _record_recovery(self, failure: Failure, last_step: int) -> bool:
        """Writes the recovery event once the relaunched run's restore and first step are in events.jsonl;
        False while they are not (yet)."""
        record = recovery_record(failure, last_step, read_events(self.run_dir, since=failure.detected_at))
        if record is None:
            return False
        append_event(self.run_dir, "recovery", **record)
        print(recovery_line(record), flush=True)
        if self.resizing is not None:
            keys = ("restored_from", "step", "steps_lost", "detect_s", "restore_s", "first_step_s", "downtime_s")
            append_event(self.run_dir, "resize", **self.resizing, **{k: record[k] for k in keys},
                         restart_s=record["restart_s"] - self.resizing["replan_s"])
            self.resizing = None
        return True


def main(config_path: str, overrides: list[str], workers: int, address: Optional[str]) -> int:
    from phalanx.config import load_config
    from phalanx.parallel import validate
    from phalanx.trainer.rundir import prepare_run_dir

    cfg = validate(load_config(config_path, overrides), workers)
    if cfg.fault.elastic and cfg.fault.min_workers > workers:
        raise ConfigError(f"fault.min_workers={cfg.fault.min_workers} > --workers={workers}: an elastic run goes on "
                          f"with at most the workers it asked for; lower fault.min_workers")
    run_dir, messages = prepare_run_dir(cfg)
    for message in messages:
        print(message, flush=True)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo") if not (address or os.environ.get("RAY_ADDRESS")) else None
    connect(address, workers)
    return Controller(cfg, os.path.abspath(config_path), overrides, workers, run_dir).run()

