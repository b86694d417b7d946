"""The checkpoint's own gloo group, its collectives, and the node each rank runs on.

Commits, restore plans and persistence barriers run on this group, never on the training collectives,
so they never queue behind a training step. In one process every collective is the identity.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any, Optional

import torch
import torch.distributed as dist


def checkpoint_group(ctx: Any, timeout_s: float) -> Optional[Any]:
    """The checkpoint's gloo group (None in one process). Made before any back end builds its own
    groups: created after DeepSpeed's initialize, it changed ZeRO-2's second-step loss on 2 gloo ranks."""
    if not ctx.distributed:
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


class CheckpointCollectives:
    """Object and tensor collectives over the checkpoint group (`group` None: one process)."""

    def __init__(self, group: Optional[Any], world_size: int):
        self.group, self.world_size = group, world_size

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        if self.group is None:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def all_reduce(self, tensor: torch.Tensor, op: Any) -> torch.Tensor:
        """`tensor` reduced in place with `op` (a `dist.ReduceOp`) across the ranks."""
        if self.group is not None:
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)


def node_ids(ctx: Any, simulate: int, group: Optional[Any]) -> list[int]:
    """Node index of every rank: `simulate` nodes in contiguous rank blocks, else the launcher's
    (PHALANX_NODE, set by the Ray controller), else by host name (collective)."""
    world = ctx.world_size
    if simulate:
        return [rank * simulate // world for rank in range(world)]
    mine = os.environ.get("PHALANX_NODE")
    if world == 1:
        return [int(mine) if mine else 0]
    hosts: list[Any] = [None] * world
    dist.all_gather_object(hosts, int(mine) if mine else socket.gethostname(), group=group)
    if mine:
        return hosts
    order = sorted(set(hosts), key=hosts.index)
    return [order.index(h) for h in hosts]
