"""The simulator of a whole run under failures: event-driven, it jumps from failure to failure (never step by step),
so a run of millions of steps on thousands of nodes takes milliseconds. Deterministic from its seed."""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Optional

from phalanx.errors import ConfigError
from phalanx.planner.goodput_terms import HOUR, KEYS, KINDS, MODES, FailureRates, Outcome, RecoveryTerms, \
    young_daly_interval


@dataclass
class _Episode:
    """One recovery: the failures in it (a failure during recovery restarts it) and the path it needs."""

    kinds: list[str] = field(default_factory=list)
    lost_groups: dict[int, int] = field(default_factory=dict)  # erasure group -> nodes lost in this episode
    storage: bool = False  # more than m nodes of a group (or a node without erasure coding): storage restore
    shrink: bool = False  # a node lost without a spare: elastic replan + reshard
    grow: bool = False  # a repaired node rejoins a shrunk run
    wait: bool = False  # spares mode: a node lost and no spare left, the run waits for a repaired node


class _Run:
    """State of one simulated run; `simulate` drives it."""

    def __init__(self, terms: RecoveryTerms, rates: FailureRates, nodes: int, mode: str, seed: int, persist_every: int,
                 snapshot_every: int, spares: int, k: int, m: int, checkpoint_every: int):
        self.terms, self.rates, self.nodes, self.mode = terms, rates, nodes, mode
        self.rng = random.Random(seed)
        self.anchor = mode == "checkpoint_restart"
        self.snap_every = checkpoint_every if self.anchor else snapshot_every
        self.snap_cost = 0.0 if self.anchor else terms.snapshot_cost(snapshot_every)
        self.persist_every = checkpoint_every if self.anchor else persist_every
        self.persist_cost = terms.save_s if self.anchor else terms.persist_s
        self.k, self.m = k, m
        self.coded = m > 0 and k + m <= nodes
        self.t, self.step, self.snap, self.saved = 0.0, 0, 0, 0
        self.live, self.pool, self.missing = nodes, spares, 0
        self.returns: list[float] = []  # repaired nodes' return times (heap)
        self.acc = dict.fromkeys(KEYS, 0.0)
        self.counts = {**dict.fromkeys(KINDS, 0), "storage": 0, "spare": 0, "shrink": 0, "grow": 0, "wait": 0}

    def factor(self) -> float:
        return self.nodes / self.live

    def cost(self, a: int, b: int) -> dict[str, float]:
        """Seconds of steps a+1..b by category, at the current size."""
        f, n = self.factor(), b - a
        return {"train": n * self.terms.step_s, "shrunk": (f - 1) * n * self.terms.step_s,
                "snapshot": f * self.snap_cost * (b // self.snap_every - a // self.snap_every),
                "persist": f * self.persist_cost * (b // self.persist_every - a // self.persist_every)}

    def steps_within(self, budget: float, limit: int) -> int:
        """The furthest step (<= limit) the run reaches from self.step within `budget` seconds."""
        lo, hi = self.step, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if sum(self.cost(self.step, mid).values()) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def run(self, until: float, steps: int) -> None:
        """Train from self.t until `until` (or the last step); a partial step at `until` is lost."""
        budget = until - self.t
        per_step = self.factor() * self.terms.step_s
        reach = self.steps_within(budget, min(steps, self.step + int(budget / per_step) + 1))
        spent = self.cost(self.step, reach)
        for key, value in spent.items():
            self.acc[key] += value
        used = sum(spent.values())
        self.step = reach
        self.snap = max(self.snap, reach // self.snap_every * self.snap_every)
        self.saved = max(self.saved, reach // self.persist_every * self.persist_every)
        self.t += used
        if self.step < steps:
            self.acc["lost"] += until - self.t  # the step in progress when the failure came
            self.t = until

    def roll_back(self, to: int) -> None:
        """Steps after `to` are lost: their seconds move to "lost"."""
        if to >= self.step:
            return
        for key, value in self.cost(to, self.step).items():
            moved = min(value, self.acc[key])
            self.acc[key] -= moved
            self.acc["lost"] += moved
        self.step = to
        self.snap = min(self.snap, to)

    def grow(self) -> _Episode:
        """A repaired node rejoins a shrunk run: it snapshots, replans and reshards; no step is lost."""
        self.live += 1
        self.counts["grow"] += 1
        self.snap = self.step
        return _Episode(grow=True)

    def draw_kind(self) -> str:
        u = self.rng.random()
        return "node" if u < self.rates.node_share else "hang" if u < self.rates.node_share + self.rates.hang_share \
            else "process"

    def fail(self, ep: _Episode) -> None:
        """A failure joins the recovery episode `ep` (and rolls the run back as far as its path needs)."""
        kind = self.draw_kind()
        self.counts[kind] += 1
        ep.kinds.append(kind)
        if kind == "node" and not self.anchor:
            heapq.heappush(self.returns, self.t + self.rates.repair_hours * HOUR)
            group = self.rng.randrange(self.nodes) // (self.k + self.m) if self.coded else 0
            ep.lost_groups[group] = ep.lost_groups.get(group, 0) + 1
            if not self.coded or ep.lost_groups[group] > self.m:
                ep.storage = True
            if self.pool > 0:
                self.pool -= 1
                self.counts["spare"] += 1
            elif self.mode == "elastic" and self.live > 1:
                self.live -= 1
                ep.shrink = True
                self.counts["shrink"] += 1
            else:
                self.missing += 1
                self.counts["wait"] += 1
                ep.wait = True
        if self.anchor or ep.storage:
            self.roll_back(self.saved)
        else:
            self.roll_back(self.snap)

    def plan(self, ep: _Episode) -> list[tuple[str, float]]:
        """The segments of the recovery `ep` needs from now, in order."""
        T = self.terms
        if ep.grow and not ep.kinds:  # a repaired node rejoins: snapshot, replan, restart, reshard; nothing lost
            return [("restart", T.replan_s + T.restart_s), ("restore", T.reshard_s), ("restart", T.first_step_s)]
        last = ep.kinds[-1]
        detect = {"process": T.detect_process_s, "node": T.detect_node_s, "hang": T.detect_hang_s}[last]
        if self.anchor:
            return [("detect", detect), ("restart", T.restart_job_s), ("restore", T.restore_storage_s),
                    ("restart", T.first_step_s)]
        restart = T.restart_s + (T.replan_s if ep.shrink or ep.grow else 0.0)
        if ep.storage:
            restore = T.restore_storage_s
        elif ep.shrink or ep.grow:
            restore = T.reshard_s
        elif "node" in ep.kinds:
            restore = T.restore_peer_s
        else:
            restore = T.restore_keeper_s
        return [("detect", detect), ("restart", restart), ("restore", restore), ("restart", T.first_step_s)]


def simulate(terms: RecoveryTerms, rates: FailureRates, *, nodes: int, steps: int, mode: str, seed: int = 0,
             persist_every: int, snapshot_every: int = 1, spares: int = 0, erasure_k: int = 0, erasure_m: int = 0,
             checkpoint_every: Optional[int] = None) -> Outcome:
    """A run of `steps` steps on `nodes` nodes with failures drawn from `rates` (Poisson in wall time, during recovery
    too: a failure then starts the recovery again). Event-driven: it jumps from failure to failure. Deterministic
    from `seed`. Modes: "spares" (a lost node is replaced by a warm spare, else the run waits for a repaired one),
    "elastic" (spares first, else the run shrinks and grows back when the node returns), "checkpoint_restart"
    (every failure requeues the job from the newest storage checkpoint, every `checkpoint_every` steps; None:
    Young/Daly's interval)."""
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is not one of {', '.join(MODES)}")
    if nodes < 1 or steps < 1:
        raise ConfigError(f"nodes={nodes} and steps={steps} must be >= 1")
    if erasure_m and erasure_m >= nodes:
        raise ConfigError(f"erasure_m={erasure_m} parity nodes with nodes={nodes}: parity needs nodes of its own; "
                          f"use erasure_m <= {max(0, nodes - 2)} (and erasure_k + erasure_m <= nodes)")
    if erasure_m and erasure_k + erasure_m > nodes:
        raise ConfigError(f"erasure_k({erasure_k}) + erasure_m({erasure_m}) > nodes({nodes}): a group spans k + m "
                          f"nodes; use erasure_k <= {nodes - erasure_m}")
    if min(persist_every, snapshot_every, spares, erasure_k, erasure_m) < 0:
        raise ConfigError("persist_every, snapshot_every, spares, erasure_k and erasure_m must be >= 0")
    if mode == "checkpoint_restart" and checkpoint_every is None:
        checkpoint_every = anchor_interval(terms, rates, nodes)
    every = max(1, checkpoint_every or steps)
    persist_every = persist_every or steps  # 0: persisted at the end only
    snapshot_every = snapshot_every or persist_every
    run = _Run(terms, rates, nodes, mode, seed, persist_every, snapshot_every, spares, erasure_k, erasure_m, every)
    node_rate = rates.node_rate_per_s()
    ep: Optional[_Episode] = None
    segments: list[tuple[str, float]] = []
    while run.step < steps:
        hardware = (run.live - run.missing) * node_rate
        next_fail = run.t + run.rng.expovariate(hardware) if hardware > 0 else math.inf
        next_return = run.returns[0] if run.returns else math.inf
        if ep is None:  # training
            if run.live < nodes and run.pool > 0:  # a node came back during a recovery that could not take it
                run.pool -= 1
                ep = run.grow()
                segments = run.plan(ep)
                continue
            if next_return < next_fail:
                run.run(next_return, steps)
                if run.step >= steps:
                    break
                heapq.heappop(run.returns)
                if run.live < nodes:
                    ep = run.grow()
                    segments = run.plan(ep)
                else:
                    run.pool += 1
                continue
            run.run(next_fail, steps)
            if run.step >= steps:
                break
            ep = _Episode()
            run.fail(ep)
            segments = run.plan(ep)
            continue
        if ep.wait and run.missing:  # spares mode without a spare: the run waits for a repaired node
            event = min(next_fail, next_return)
            run.acc["wait"] += event - run.t
            run.t = event
            if next_fail < next_return:
                run.fail(ep)
            else:
                heapq.heappop(run.returns)
                run.missing -= 1
            segments = run.plan(ep)
            continue
        # recovering: through the segments until the next failure or return
        while segments and run.t + segments[0][1] <= min(next_fail, next_return):
            key, seconds = segments.pop(0)
            run.acc[key] += seconds
            run.t += seconds
        if not segments:
            run.counts["storage"] += ep.storage
            ep = None
            continue
        event = min(next_fail, next_return)
        key, seconds = segments[0]
        run.acc[key] += event - run.t
        segments[0] = (key, seconds - (event - run.t))
        run.t = event
        if next_return < next_fail:
            heapq.heappop(run.returns)
            if run.live < nodes and (ep.shrink or ep.grow):
                run.live += 1  # it joins the layout this recovery is about to pick
            else:
                run.pool += 1  # a spare again (or, for a shrunk run, it grows when the recovery ends)
            continue
        run.fail(ep)
        segments = run.plan(ep)
    total = sum(run.acc.values())
    breakdown = {key: value / total for key, value in run.acc.items()}
    return Outcome(mode=mode, ettr=breakdown["train"], breakdown=breakdown, failures=sum(run.counts[k] for k in KINDS),
                   wall_s=total, by_kind=run.counts)


def anchor_interval(terms: RecoveryTerms, rates: FailureRates, nodes: int) -> int:
    """Checkpoint-restart's best interval in steps (Young/Daly, every failure counted)."""
    system_mtbf = rates.node_mtbf_hours * HOUR / nodes
    return max(1, round(young_daly_interval(terms.save_s, system_mtbf) / terms.step_s))
