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
