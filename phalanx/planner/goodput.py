"""Goodput: what failures cost a run, and the checkpoint settings that cost least (`phalanx plan --failures`).

  * `FailureRates`: how often a node fails and how (the whole node, one process, a hang);
  * `RecoveryTerms`: what each failure costs, term by term; `terms_for` derives them from a costed layout and a
    `ClusterPreset` (documented GPU-cluster figures, or this machine's, measured by `calibrate_failures.py`);
  * `simulate`: a whole run replayed against failures drawn from the rates, for phalanx's modes (warm spares;
    elastic shrink) and checkpoint-restart from storage at its Young/Daly interval (the anchor). It reports the
    effective training time ratio (ETTR): the wall time of the kept steps, at full size and without overheads,
    over the whole wall time, and where the rest went;
  * `recommend`: snapshot and persist intervals, the erasure code, the spares, and each mode's predicted ETTR.

Everything here is pure: no torch at import, no I/O (the planner's cost model is imported inside `terms_for`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from phalanx.errors import ConfigError
from phalanx.planner.goodput_terms import (HOUR, KEYS, LLAMA3_NODE_MTBF_HOURS, MODES, FailureRates, Outcome,
                                           RecoveryTerms, group_loss_probability, poisson_tail, young_daly_interval)
from phalanx.planner.simulator import anchor_interval, simulate

__all__ = ["ClusterPreset", "FailureRates", "GPU_CLUSTER", "HOUR", "KEYS", "LLAMA3_NODE_MTBF_HOURS", "MODES", "Outcome",
           "Recommendation", "RecoveryTerms", "anchor_interval", "choose_erasure", "group_loss_probability",
           "poisson_tail", "recommend", "simulate", "terms_for", "young_daly_interval"]

PERSIST_CAP_S = HOUR  # persist at least hourly: what no keeper survives (a whole-cluster outage) costs an hour at most
GROUP_LOSS_TARGET = 1e-3  # chance, between two persists, that any group loses more nodes than it can rebuild
SPARE_STALL_TARGET = 1e-3  # share of the time a spares-mode run may wait for a node because every spare is in use
MAX_K = 8  # data blocks per group: a rebuild reads k blocks over the NIC, so k trades memory for restore time


@dataclass(frozen=True)
class ClusterPreset:
    """Rates and fixed costs of a cluster that are not in the planner's `Topology`."""

    name: str
    host_copy_bytes_per_s: float  # device <-> host copy per device (a snapshot, a restore from keeper memory)
    snapshot_launch_s: float  # what snapshot() itself holds the training thread
    snapshot_interference: float  # share of a hidden copy's time that still shows in the step (memory traffic)
    decode_bytes_per_s: float  # erasure decode, data bytes per second
    storage_bytes_per_s: float  # persistent storage, whole cluster
    restart_s: float  # phalanx: new processes on warm spares until they are ready to restore (at scale)
    restart_job_s: float  # checkpoint-restart: requeue the whole job until it is ready to load
    replan_s: float  # the planner's search for the new world size (elastic)
    first_step_steps: float = 1.0  # the first step after a restore costs this many extra steps (warm-up)


# H100-class cluster (see docs/plan.md, "Goodput"). Measured by phalanx on one H100 (benchmarks/RESULTS.md,
# checkpoint): device-to-host copy 52 GB/s; snapshot() stall 0.9 ms; a hidden 82 ms copy cost 2.3 ms of a step
# (2.8%); Triton GF(2^8) decode 305 GB/s. Llama 3's storage (Tectonic): 2 TB/s sustained. Assumed (not published
# for this scale): 60 s for phalanx's new processes to start and form their groups at 16k ranks, 15 min to requeue a
# whole job (allocation, health checks, 16k processes, NCCL init), 10 s to replan.
GPU_CLUSTER = ClusterPreset(name="gpu", host_copy_bytes_per_s=50e9, snapshot_launch_s=1e-3, snapshot_interference=0.03,
                            decode_bytes_per_s=300e9, storage_bytes_per_s=2e12, restart_s=60.0, restart_job_s=900.0,
                            replan_s=10.0)


def terms_for(cfg: Any, layout: Any, topo: Any, preset: ClusterPreset = GPU_CLUSTER,
              erasure_k: Optional[int] = None) -> RecoveryTerms:
    """Recovery terms of `layout` (a `Layout`, or the planner's `StepCost` of it) on `topo`.

    State per rank = parameters + optimizer state of the fullest rank (what a snapshot holds); the model's whole
    state = 12 bytes per parameter (fp32 weights and two AdamW moments, replicas saved once, as DCP does)."""
    from phalanx.planner.cost import StepCost, step_cost
    from phalanx.planner.shapes import model_shapes

    cost = layout if isinstance(layout, StepCost) else step_cost(cfg, layout, topo)
    k = cfg.checkpoint.erasure_k if erasure_k is None else erasure_k
    state = cost.memory.params + cost.memory.optim
    whole = model_shapes(cfg.model).total * 12
    nic = topo.inter.bandwidth
    host = preset.host_copy_bytes_per_s
    copy = state / host
    storage = whole / preset.storage_bytes_per_s + copy  # through host memory, at the storage's pace
    heartbeat = cfg.fault.heartbeat_s
    return RecoveryTerms(
        step_s=cost.step_s,
        snapshot_s=preset.snapshot_launch_s + preset.snapshot_interference * copy,
        snapshot_copy_s=copy,
        persist_s=preset.snapshot_launch_s,  # the keepers write from their memory; the trainer only asks
        # the controller's checks (launch/controller.py): a dead actor within 2 heartbeats + 1 s, a silent node's
        # heartbeat call times out after max(5 s, 3 heartbeats); a hang waits out the collective timeout
        detect_process_s=2 * heartbeat + 1.0,
        detect_node_s=max(5.0, 3 * heartbeat),
        detect_hang_s=cfg.fault.collective_timeout_s,
        restart_s=preset.restart_s,
        restore_keeper_s=copy,
        # the replacement reads k surviving blocks over its NIC and decodes them, then copies to the device
        restore_peer_s=k * state / nic + k * state / preset.decode_bytes_per_s + copy,
        restore_storage_s=storage,
        replan_s=preset.replan_s,
        reshard_s=state / nic + copy,  # each rank gathers its new shards from the keepers, then copies them in
        first_step_s=preset.first_step_steps * cost.step_s,
        restart_job_s=preset.restart_job_s,
        checkpoint_s=storage,
    )


def choose_erasure(rates: FailureRates, nodes: int, window_s: float, reprotect_s: float) -> tuple[int, int, float]:
    """(k, m, probability that any group loses more than m nodes within `window_s`): the fewest parity blocks that
    keep that probability under GROUP_LOSS_TARGET, then the most data blocks (least parity memory, m / k) up to
    MAX_K. One node: no coding (a lost node's state comes from storage)."""
    if nodes < 2:
        return 1, 0, 0.0
    lam = rates.node_rate_per_s() * rates.node_share
    best = (1, 0, 1.0)
    for m in (1, 2, 3):
        k = min(MAX_K, nodes - m)
        if k < 1:
            break
        k = 2 ** int(math.log2(k))
        groups = max(1, nodes // (k + m))
        p = 1 - (1 - group_loss_probability(k, m, lam, window_s, reprotect_s)) ** groups
        best = (k, m, p)
        if p <= GROUP_LOSS_TARGET:
            break
    return best


def spares_needed(rates: FailureRates, nodes: int) -> int:
    """Warm spares for a run that cannot shrink: nodes in repair are Poisson (losses x repair time), and the run
    waits whenever more are out than it holds spares; hold enough that this is under SPARE_STALL_TARGET."""
    mean = nodes * rates.node_share * rates.repair_hours / rates.node_mtbf_hours
    s = 0
    while poisson_tail(mean, s) > SPARE_STALL_TARGET:
        s += 1
    return s


def snapshot_interval(terms: RecoveryTerms, system_mtbf_s: float) -> int:
    """Steps between snapshots that waste least: a snapshot's cost per step against half an interval lost per
    failure (every failure short of a storage restore rolls back to the newest snapshot)."""
    def waste(every: int) -> float:
        span = every * terms.step_s
        return terms.snapshot_cost(every) / span + span / (2 * system_mtbf_s)

    young = young_daly_interval(terms.snapshot_cost(1) + terms.snapshot_copy_s, system_mtbf_s) / terms.step_s
    candidates = {1, *(max(1, round(young * f)) for f in (0.25, 0.5, 1, 2, 4))}
    candidates |= {max(1, math.ceil(terms.snapshot_copy_s / terms.step_s))}  # the first that hides the copy
    return min(sorted(candidates), key=waste)


@dataclass
class Recommendation:
    """What `phalanx plan --failures` recommends, and each mode's predicted outcome."""

    snapshot_every: int
    persist_every: int
    erasure_k: int
    erasure_m: int
    group_loss_p: float  # any group loses more than m nodes between two persists
    spares: int
    checkpoint_every: int  # the anchor's (Young/Daly) interval
    steps: int
    outcomes: dict[str, Outcome] = field(default_factory=dict)


def recommend(terms: RecoveryTerms, rates: FailureRates, *, nodes: int, steps: int, seed: int = 0,
              modes: tuple[str, ...] = MODES) -> Recommendation:
    """Intervals, erasure code and spares for `nodes` under `rates`, and each mode simulated over `steps` steps."""
    if nodes < 1 or steps < 1:
        raise ConfigError(f"--nodes={nodes} and the simulated steps ({steps}) must be >= 1")
    system_mtbf = rates.node_mtbf_hours * HOUR / nodes
    snapshot_every = snapshot_interval(terms, system_mtbf)
    persist_every = max(1, min(steps, math.floor(PERSIST_CAP_S / terms.step_s)))
    reprotect = terms.detect_node_s + terms.restart_s + terms.restore_peer_s + snapshot_every * terms.step_s
    k, m, p = choose_erasure(rates, nodes, persist_every * terms.step_s, reprotect)
    spares = spares_needed(rates, nodes)
    checkpoint_every = anchor_interval(terms, rates, nodes)
    common = dict(nodes=nodes, steps=steps, seed=seed, persist_every=persist_every, snapshot_every=snapshot_every,
                  erasure_k=k, erasure_m=m)
    outcomes = {}
    for mode in modes:
        outcomes[mode] = simulate(terms, rates, mode=mode, spares=spares if mode == "spares" else 0,
                                  checkpoint_every=checkpoint_every, **common)
    return Recommendation(snapshot_every, persist_every, k, m, p, spares, checkpoint_every, steps, outcomes)

