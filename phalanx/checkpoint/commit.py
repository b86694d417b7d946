"""The commit of a snapshot: this rank's block is marked complete in its keeper, its parity contributions
go to the keepers holding its erasure group's parity, and every rank agrees in one all-reduce on the
checkpoint group that step S is complete everywhere. Only then does S count (two keeper slots keep the
previous committed step until it does)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from phalanx.checkpoint.collectives import CheckpointCollectives
from phalanx.checkpoint.erasure import ErasureCodec
from phalanx.checkpoint.groups import ErasureGroup
from phalanx.checkpoint.measure import Measurement
from phalanx.checkpoint.peers import PeerKeepers
from phalanx.checkpoint.slots import KeeperSlots
from phalanx.checkpoint.wire import WireError
from phalanx.errors import PhalanxError


class SnapshotCommit:
    """Publishes this rank's block of a step (complete + parity) and agrees on the commit."""

    def __init__(self, *, slots: KeeperSlots, peers: PeerKeepers, collectives: CheckpointCollectives,
                 codec: Optional[ErasureCodec], group: Optional[ErasureGroup], index: int, rank: int, epoch: str,
                 event: Callable[..., None]):
        self.slots, self.peers, self.collectives, self.codec = slots, peers, collectives, codec
        self.group, self.index, self.rank, self.epoch, self.event = group, index, rank, epoch, event
        self.committed: Optional[int] = None
        self.last_error: Optional[str] = None
        self.published: tuple[Optional[int], int] = (None, 0)  # the last step published, and how many times

    def publish(self, step: int, slot: int, measured: Measurement) -> bool:
        """Mark the block of `step` in `slot` complete and send its parity; False (and `last_error`) if not."""
        last, times = self.published
        self.published = (step, times + 1 if last == step else 1)
        try:
            self.slots.call("complete", rank=self.rank, slot=slot, step=step)
            if self.group is not None:
                self._send_parity(step, self.slots.blocks[slot], measured)
        except (WireError, PhalanxError) as err:
            self.last_error = str(err)
            return False
        return True

    def _send_parity(self, step: int, block: torch.Tensor, measured: Measurement) -> None:
        group = self.group
        length = max(measured.block_lengths[r] for r in group.members)
        # a step published again (its snapshot retaken after it did not commit, by every rank alike) is a new
        # computation: its parity starts over instead of adding this rank's contribution twice
        times = self.published[1]
        epoch = self.epoch if times == 1 else f"{self.epoch}.{times}"
        for j, contribution in enumerate(self.codec.parity_contributions(self.index, block)):
            node = group.parity_nodes[j]
            reply, _ = self.peers.call(node, "parity_add", payload=memoryview(contribution.numpy()), gid=group.gid,
                                       j=j, step=step, index=self.index, members=list(group.members), length=length,
                                       k=self.codec.k, m=self.codec.m, fp=measured.fingerprint, epoch=epoch)
            if reply.get("need_layout"):  # once per keeper and layout: what a decode of this block needs to read it
                self.peers.call(node, "member_layout", rank=self.rank, fp=measured.fingerprint,
                                layout=measured.plan["layout"], nbytes=measured.layout.nbytes)

    def agree(self, step: int, ok: bool, busy: bool) -> tuple[bool, bool]:
        """(every rank published `step`: it is committed, some rank's keeper is still persisting) after one
        all-reduce of this rank's `ok` and `busy`."""
        done = torch.tensor([step if ok else -1, -1 if busy else 0], dtype=torch.int64)
        self.collectives.all_reduce(done, dist.ReduceOp.MIN)
        if int(done[0]) != step:
            self.event("snapshot_failed", step=step, rank=self.rank, error=self.last_error)
            return False, False
        self.committed = step
        return True, int(done[1]) != 0
