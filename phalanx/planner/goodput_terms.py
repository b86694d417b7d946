"""The failure model's inputs and closed forms: failure rates, recovery terms, a run's outcome, Young/Daly's
interval and the probability that an erasure group loses more than it can rebuild. `goodput.py` is the entry."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from phalanx.errors import ConfigError

HOUR = 3600.0
MODES = ("spares", "elastic", "checkpoint_restart")
KEYS = ("train", "snapshot", "persist", "detect", "restart", "restore", "wait", "lost", "shrunk")
KINDS = ("process", "node", "hang")


@dataclass(frozen=True)
class FailureRates:
    """Failures of one node: a Poisson process of mean interval `node_mtbf_hours`; a `node_share` of them take the
    whole node (its GPUs, host memory and keeper), a `hang_share` are hangs, the rest kill one process."""

    node_mtbf_hours: float
    node_share: float = 0.78
    hang_share: float = 0.02
    repair_hours: float = 24.0  # a lost node is out this long (diagnosis, swap, burn-in) before it serves again

    def __post_init__(self) -> None:
        if not self.node_mtbf_hours > 0:
            raise ConfigError(f"--mtbf-hours={self.node_mtbf_hours} must be > 0 (mean hours between failures of "
                              f"one node; Llama 3's 16,384 H100s: {LLAMA3_NODE_MTBF_HOURS:.0f})")
        for name, value in (("--node-share", self.node_share), ("--hang-share", self.hang_share)):
            if not 0 <= value <= 1:
                raise ConfigError(f"{name}={value} must be a fraction between 0 and 1")
        if self.node_share + self.hang_share > 1:
            raise ConfigError(f"--node-share({self.node_share}) + --hang-share({self.hang_share}) > 1: hangs are taken "
                              f"out of the process-level failures; lower one of them")
        if not self.repair_hours > 0:
            raise ConfigError(f"repair_hours={self.repair_hours} must be > 0 (hours a lost node stays out)")

    @property
    def process_share(self) -> float:
        return 1.0 - self.node_share - self.hang_share

    def node_rate_per_s(self) -> float:
        """Failures of any kind per second of one node."""
        return 1.0 / (self.node_mtbf_hours * HOUR)

    @classmethod
    def llama3(cls) -> "FailureRates":
        """Llama 3 405B pre-training (Dubey et al. 2024, section 3.3.4): 419 unexpected interruptions in a 54-day
        snapshot on 16,384 H100s = 2,048 nodes of 8, so one node failed every 2,048 * 54 * 24 h / 419 = 6,335 h.
        About 78% were attributed to hardware (GPU, HBM, host, network), taken here as losing the node; the
        paper counts few hangs, so 2% are hangs (timeouts) and the other 20% kill one process."""
        return cls(node_mtbf_hours=LLAMA3_NODE_MTBF_HOURS, node_share=0.78, hang_share=0.02)

    @classmethod
    def from_cluster_rates(cls, nodes: int, process_per_s: float, node_per_s: float, hang_per_s: float = 0.0,
                           repair_hours: float = 24.0) -> "FailureRates":
        """Rates from a whole cluster's failures per second (fault injection, a log of a real run)."""
        total = process_per_s + node_per_s + hang_per_s
        if nodes < 1 or min(process_per_s, node_per_s, hang_per_s) < 0 or total <= 0:
            raise ConfigError(f"cluster rates need nodes >= 1 and rates >= 0 with some failures; got nodes={nodes}, "
                              f"process={process_per_s}, node={node_per_s}, hang={hang_per_s} per second")
        return cls(node_mtbf_hours=nodes / total / HOUR, node_share=node_per_s / total, hang_share=hang_per_s / total,
                   repair_hours=repair_hours)


LLAMA3_NODE_MTBF_HOURS = 2048 * 54 * 24 / 419


@dataclass(frozen=True)
class RecoveryTerms:
    """What training and each failure cost, in seconds (see `recovery.terms_for` for the model of each)."""

    step_s: float  # one training step, failure-free
    snapshot_s: float  # what one in-memory snapshot adds to its step
    persist_s: float  # what one persist to storage blocks its step (keepers write it; little)
    detect_process_s: float  # a dead process until recovery starts
    detect_node_s: float  # a lost node until recovery starts
    detect_hang_s: float  # a hang: the collective timeout
    restart_s: float  # new processes until they are ready to restore
    restore_keeper_s: float  # from the node's keeper memory
    restore_peer_s: float  # a lost node's state onto a spare: peer copies or erasure decode over the NIC
    restore_storage_s: float  # from persistent storage
    replan_s: float  # elastic shrink or grow: the planner picks the layout for the nodes left
    reshard_s: float  # elastic: state of the old layout into the new one, from the keepers
    first_step_s: float  # the first step after a restore takes this much longer than step_s
    restart_job_s: float  # checkpoint-restart: the scheduler requeues the whole job, processes start, groups form
    # checkpoint-restart's save to storage, blocking the step; None: as long as restore_storage_s (same bytes, same
    # storage bandwidth)
    checkpoint_s: Optional[float] = None
    # the device-to-host copy of one snapshot; it runs behind the steps until the next snapshot, and what is left of
    # it then stalls the step (invariant 3: the copy ends before the optimizer touches the parameters again)
    snapshot_copy_s: float = 0.0

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.__dict__.items() if v is not None and not (v >= 0 and math.isfinite(v))}
        if bad or not self.step_s > 0:
            raise ConfigError(f"recovery terms must be finite seconds >= 0 and step_s > 0; got {bad or self.step_s}; "
                              f"recalibrate with `phalanx plan CONFIG --failures --calibrate`")

    @property
    def save_s(self) -> float:
        return self.restore_storage_s if self.checkpoint_s is None else self.checkpoint_s

    def snapshot_cost(self, every: int) -> float:
        """Seconds one snapshot adds when taken every `every` steps: the launch and the copy's interference, and the
        part of the copy the steps until the next snapshot cannot hide."""
        return self.snapshot_s + max(0.0, self.snapshot_copy_s - every * self.step_s)


@dataclass
class Outcome:
    """One simulated run: ETTR and where the rest of the wall time went (fractions of it, summing to 1)."""

    mode: str
    ettr: float
    breakdown: dict[str, float]
    failures: int
    wall_s: float
    by_kind: dict[str, int] = field(default_factory=dict)  # failures per kind, and recoveries per path


def young_daly_interval(checkpoint_s: float, system_mtbf_s: float) -> float:
    """Seconds between checkpoints that waste least: Daly's (2006) higher-order form of Young's sqrt(2 C M)."""
    if checkpoint_s <= 0:
        return 0.0
    if checkpoint_s >= 2 * system_mtbf_s:
        return system_mtbf_s
    ratio = checkpoint_s / (2 * system_mtbf_s)
    return math.sqrt(2 * checkpoint_s * system_mtbf_s) * (1 + math.sqrt(ratio) / 3 + ratio / 9) - checkpoint_s


def _binomial_tail(n: int, p: float, at_least: int) -> float:
    """P(Binomial(n, p) >= at_least)."""
    if at_least <= 0:
        return 1.0
    if at_least > n:
        return 0.0
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(at_least, n + 1))


def group_loss_probability(k: int, m: int, node_loss_per_s: float, window_s: float, reprotect_s: float) -> float:
    """Probability that one erasure group of k + m nodes loses more than m of them at once within `window_s` (two
    persists apart): a first loss (rate (k+m) * lambda), then m more of the other k + m - 1 nodes before the group is
    protected again (`reprotect_s`: recovery and the next snapshot re-encode it)."""
    if k < 1 or m < 0:
        raise ConfigError(f"erasure k={k}, m={m}: k must be >= 1 and m >= 0")
    p = 1.0 - math.exp(-node_loss_per_s * reprotect_s)
    rate = (k + m) * node_loss_per_s * _binomial_tail(k + m - 1, p, m)
    return 1.0 - math.exp(-rate * window_s)


def poisson_tail(mean: float, above: int) -> float:
    """P(Poisson(mean) > above)."""
    term, cdf = math.exp(-mean), 0.0
    for i in range(above + 1):
        cdf += term
        term *= mean / (i + 1)
    return max(0.0, 1.0 - cdf)
