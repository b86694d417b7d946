"""Instrumented collectives: every collective phalanx issues goes through here.

Off by default. When on (`parallel.comm_stats=true`), each call adds its bytes (what this rank
sends) and wall time to a per-step table keyed by (collective kind, mesh dimension); the trainer
reads and clears the table once per logged step. The planner and the failure detector build on
these numbers. On CUDA the time of an asynchronous NCCL call is its launch time unless the caller
synchronises; on CPU (gloo) calls are synchronous and the time is the transfer.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from phalanx.telemetry import health


@dataclass
class CommStats:
    """Bytes sent, calls and seconds per (kind, mesh dimension) since the last `take()`."""

    enabled: bool = False
    table: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0.0]))

    def add(self, kind: str, dim: str, nbytes: int, seconds: float) -> None:
        row = self.table[(kind, dim)]
        row[0] += 1
        row[1] += nbytes
        row[2] += seconds

    def take(self) -> dict[str, dict[str, float]]:
        """{"kind/dim": {"calls", "bytes", "seconds"}} and reset."""
        out = {f"{kind}/{dim}": {"calls": int(c), "bytes": int(b), "seconds": s}
               for (kind, dim), (c, b, s) in sorted(self.table.items())}
        self.table.clear()
        return out


STATS = CommStats()


def enable(on: bool = True) -> None:
    STATS.enabled = on
    STATS.table.clear()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def all_to_all_single(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup, dim: str,
                      output_split_sizes: Optional[list[int]] = None,
                      input_split_sizes: Optional[list[int]] = None) -> torch.Tensor:
    """`dist.all_to_all_single` over `group` (the mesh dimension `dim`), counted."""
    start = time.perf_counter() if STATS.enabled else 0.0
    seq = health.enter(f"all_to_all/{dim}")
    dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group)
    health.leave(seq)
    if STATS.enabled:
        STATS.add("all_to_all", dim, _nbytes(input), time.perf_counter() - start)
    return output


def all_reduce(tensor: torch.Tensor, group: Optional[dist.ProcessGroup], dim: str,
               op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place `dist.all_reduce` over `group`, counted."""
    start = time.perf_counter() if STATS.enabled else 0.0
    seq = health.enter(f"all_reduce/{dim}")
    dist.all_reduce(tensor, op=op, group=group)
    health.leave(seq)
    if STATS.enabled:
        STATS.add("all_reduce", dim, _nbytes(tensor), time.perf_counter() - start)
    return tensor


def ddp_counting_hook(dim: str):
    """A DDP communication hook: the default bucket all-reduce (average), counted under `dim`."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):  # no annotations: DDP checks them and `from __future__` makes them strings
        if STATS.enabled:
            # The bucket's all-reduce is asynchronous: bytes are exact, time is not attributed here.
            STATS.add("all_reduce", dim, _nbytes(bucket.buffer()), 0.0)
        seq = health.enter(f"all_reduce/{dim}")
        future = allreduce_hook(state, bucket)
        if not seq:
            return future

        def done(fut):
            health.leave(seq)
            return fut.value()

        return future.then(done)

    return hook


def count_sends(ops: list, dim: str) -> list:
    """Count the sends among point-to-point ops (pipeline activations and gradients) under ("send", dim).
    Bytes only: the ops run batched and asynchronously, so their time is the schedule's, not theirs."""
    if STATS.enabled:
        for op in ops:
            if op.op in (dist.isend, dist.send):
                STATS.add("send", dim, _nbytes(op.tensor), 0.0)
    return ops


def fsdp_counting_comms(dim: str) -> tuple:
    """(all-gather, reduce-scatter) comms for FSDP2's `set_custom_all_gather` / `set_custom_reduce_scatter`:
    torch's default calls, counted under `dim`. Bytes are each call's input buffer, as everywhere here: the
    parameter shard an all-gather sends, the whole (padded) gradient a reduce-scatter reduces."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

    class CountingAllGather(DefaultAllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            if STATS.enabled:
                STATS.add("all_gather", dim, _nbytes(input_tensor), 0.0)
            return super().__call__(output_tensor, input_tensor, group, async_op)

    class CountingReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            if STATS.enabled:
                STATS.add("reduce_scatter", dim, _nbytes(input_tensor), 0.0)
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    return CountingAllGather(), CountingReduceScatter()


def all_gather(tensor: torch.Tensor, group: dist.ProcessGroup, dim: str) -> torch.Tensor:
    """Every rank's `tensor` of `group`, stacked along a new first dimension, counted."""
    start = time.perf_counter() if STATS.enabled else 0.0
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    seq = health.enter(f"all_gather/{dim}")
    dist.all_gather(parts, tensor.contiguous(), group=group)
    health.leave(seq)
    if STATS.enabled:
        STATS.add("all_gather", dim, _nbytes(tensor), time.perf_counter() - start)
    return torch.stack(parts)
