"""What a keeper holds for a rank: its snapshot slots (shared-memory files) and the plan it registered
(flat layout, persistence plan, fingerprint, world size and parallel layout of the launch); and the parity
blocks of its erasure groups, with the flat layouts of their members (a member lost with its node is decoded
and, when a launch of another layout restores, resharded: its layout must outlive it). A launch of another
layout registering a rank retires that rank's memory (kept aside under its fingerprint) until the new layout
commits a step, so the new launch can reshard it."""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Slot:
    path: str
    buffer: mmap.mmap
    step: Optional[int] = None
    status: str = "empty"  # empty | filling | complete
    pinned: int = 0


@dataclass
class RankState:
    nbytes: int
    slots: list[Slot]
    plan: dict[str, Any] = field(default_factory=dict)  # layout and persistence plan (persistent.py)


@dataclass
class ParitySlot:
    step: int
    buffer: bytearray
    members: list[int]
    fingerprint: str = ""
    epoch: str = ""  # the launch that computed it; a relaunch recomputes a step from scratch
    k: int = 0  # the code it is a parity of (0: not said); a decode needs both
    m: int = 0
    got: set = field(default_factory=set)

    @property
    def complete(self) -> bool:
        return len(self.got) == len(self.members)


def held_steps(state: RankState) -> dict[str, Any]:
    """What a rank's memory holds, for `inventory`: its layout (fingerprint, world, parallel layout) and steps."""
    return {"fp": state.plan.get("fingerprint"), "world": state.plan.get("world_size"),
            "parallel": state.plan.get("parallel"),
            "steps": [[s.step, i] for i, s in enumerate(state.slots) if s.status == "complete"]}


@dataclass
class HeldParity:
    """The parity blocks a keeper holds, per (group, parity index), and the flat layouts of their groups' members
    (`member_layout`). Not thread-safe: the keeper calls it under its lock."""

    slots: dict[tuple[int, int], list[ParitySlot]] = field(default_factory=dict)
    layouts: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)  # (fingerprint, rank) -> layout

    def add(self, gid: int, j: int, step: int, index: int, members: list[int], length: int, fingerprint: str,
            epoch: str, payload: memoryview, k: int, m: int) -> dict[str, Any]:
        """XOR member `index`'s contribution into parity j of group `gid` at `step` (`payload` within `length`)."""
        import numpy as np  # not torch: a keeper of a run that only codes parity never loads it

        slots = self.slots.setdefault((gid, j), [])
        target = next((s for s in slots if s.step == step and s.epoch == epoch), None)
        if target is None:
            # Steps at or after this one belong to a timeline that was rolled back (a restore from
            # an older step): stale. Of the rest, only the newest complete parity is kept.
            complete = [s for s in slots if s.step < step and s.complete]
            slots[:] = [max(complete, key=lambda s: s.step)] if complete else []
            target = ParitySlot(step, bytearray(length), list(members), fingerprint, epoch, k, m)
            slots.append(target)
        if index in target.got:
            return {"error": f"parity {j} of group {gid} step {step} already holds member {index}"}
        if len(payload) > len(target.buffer):
            raise ValueError(f"parity payload of {len(payload)} bytes is longer than the {len(target.buffer)} "
                             f"bytes of parity {j} of group {gid} step {step}")
        target.got.add(index)
        if len(payload):
            dst = np.frombuffer(target.buffer, dtype=np.uint8, count=len(payload))
            np.bitwise_xor(dst, np.frombuffer(payload, dtype=np.uint8), out=dst)
        return {"complete": target.complete, "need_layout": (fingerprint, members[index]) not in self.layouts}

    def member_layout(self, rank: int, fingerprint: str, layout: dict[str, Any], nbytes: int) -> bool:
        """Keep member `rank`'s layout; False if no parity held here has that member."""
        if not any(s.fingerprint == fingerprint and rank in s.members for slots in self.slots.values() for s in slots):
            return False
        self.layouts[(fingerprint, rank)] = {"layout": layout, "nbytes": nbytes}
        return True

    def complete(self, gid: int, j: int, step: int) -> Optional[ParitySlot]:
        return next((s for s in self.slots.get((gid, j), []) if s.step == step and s.complete), None)

    def inventory(self) -> list[dict[str, Any]]:
        return [{"gid": gid, "j": j, "step": s.step, "members": s.members, "length": len(s.buffer),
                 "fp": s.fingerprint, "k": s.k, "m": s.m}
                for (gid, j), slots in self.slots.items() for s in slots if s.complete]

    def keep_only(self, fingerprint: str) -> None:
        """A step of layout `fingerprint` is complete: earlier layouts' parity and member layouts go."""
        for slots in self.slots.values():
            slots[:] = [s for s in slots if s.fingerprint == fingerprint]
        self.layouts = {key: v for key, v in self.layouts.items() if key[0] == fingerprint}
