"""What a snapshot's blocks look like: this rank's flat layout, every rank's block length, the
persistence plan and the fingerprint that says which keeper blocks a launch can use."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable

from phalanx.checkpoint.flat import FlatLayout
from phalanx.checkpoint.persistent import persist_plan


@dataclass(frozen=True)
class Measurement:
    """The layout of this rank's state and what every rank agreed on from theirs."""

    layout: FlatLayout
    plan: dict[str, Any]  # the persistence plan the keeper is registered with, fingerprint included
    fingerprint: str
    block_lengths: list[int]  # per rank

    @property
    def largest(self) -> int:
        """The largest block of any rank: the frame limit a keeper accepts, parity of any group included."""
        return max(self.block_lengths) if self.block_lengths else self.layout.nbytes


def measure(state: dict[str, Any], rank_local_keys: tuple[str, ...], rank: int, world_size: int,
            k: int, m: int, all_gather: Callable[[Any], list[Any]]) -> Measurement:
    """The measurement of `state` (collective through `all_gather`)."""
    layout = FlatLayout.of(state)
    plan = persist_plan(state, layout, rank_local_keys, rank, all_gather)
    layouts = all_gather([layout.nbytes, json.dumps(layout.to_json(), sort_keys=True)])
    # Blocks are usable by any launch with the same ranks and layouts, wherever the ranks now run.
    fingerprint = hashlib.sha256(json.dumps([world_size, k, m, layouts]).encode()).hexdigest()[:16]
    plan["fingerprint"] = fingerprint
    return Measurement(layout, plan, fingerprint, [n for n, _ in layouts])
