"""Ranks that share cores: how much slower each computes while others compute too, and what that does to a pipeline.

On GPUs every rank owns its device and these terms are 1. On a CPU node, ranks are processes sharing
a few cores (and memory bandwidth): with more busy ranks than free cores each rank gets a share of a
core, so a rank computes `slowdown(j)` times slower while j ranks compute at once (calibrated by
`phalanx/planner/calibrate.py`, measured with j ranks busy and the rest blocked). A pipeline's
ramp-up and ramp-down keep fewer ranks busy, so those slots run faster than the steady state: the
bubble costs less than its share of the schedule, and a stage's work is not simply divided by 1 - bubble.
"""

from __future__ import annotations

from typing import Sequence


def slowdown(contention: Sequence[float], ranks: int) -> float:
    """How much slower a rank computes while `ranks` ranks of its node compute at once.

    `contention[j - 1]` is the measured factor for j busy ranks (1.0 for j = 1); past the measured range the
    ranks split the cores evenly, so the factor grows in proportion to j. An empty sequence means devices of
    their own (1.0 always)."""
    if not contention or ranks <= 1:
        return 1.0
    if ranks <= len(contention):
        return max(1.0, float(contention[ranks - 1]))
    return max(1.0, float(contention[-1])) * ranks / len(contention)


def pipeline_slots(pp: int, microbatches: int, virtual: int = 1) -> list[int]:
    """Busy stages (ranks) in each slot of a pipeline schedule with equal stages.

    A slot is one micro-batch's forward and backward through one (virtual) stage; a schedule of m
    micro-batches over pp ranks with v chunks each takes v * m + pp - 1 slots (GPipe and 1F1B alike: the
    same ramps), of which the first and last pp - 1 have fewer ranks busy."""
    n = virtual * microbatches + pp - 1
    return [min(s + 1, pp, virtual * microbatches, n - s) for s in range(n)]


def pipeline_time(work: float, pp: int, microbatches: int, virtual: int, replicas: int,
                  contention: Sequence[float], node_ranks: int) -> float:
    """Seconds of a pipeline schedule whose slowest stage needs `work` solo seconds for one micro-batch.

    Each slot takes work / virtual times the slowdown of the ranks busy in it on one node: the busy stages
    times the `replicas` (dp x sp) that run in lock-step, at most `node_ranks`. With no contention this is
    work * (m + (pp - 1) / v), i.e. m * work / (1 - bubble)."""
    if not contention:  # devices of their own: the classic bubble, without walking thousands of slots
        return work * (microbatches + (pp - 1) / virtual)
    total = 0.0
    for busy in pipeline_slots(pp, microbatches, virtual):
        total += work / virtual * slowdown(contention, min(node_ranks, busy * replicas))
    return total
