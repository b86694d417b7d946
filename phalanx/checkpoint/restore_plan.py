"""Where a restore takes each rank's state from: a pure decision over what keepers and storage hold.

The snapshot engine gathers the facts collectively — every keeper's inventory (the complete blocks it
holds per rank and step, and its complete parity blocks) and the newest verified persisted step — and
every rank decides the same plan from them: one step and, per rank, its own node's keeper, another
node's keeper (a peer copy) or an erasure decode from its group's surviving blocks and parity. Memory
is used when it holds a step complete for every rank that is at least as new as storage's (it loses
nothing storage has and is read at memory speed); storage otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

Source = tuple[str, Optional[int]]  # ("data", node holding the block) or ("decode", None)


@dataclass(frozen=True)
class RestorePlan:
    step: Optional[int]  # None: nothing to restore, the run starts fresh
    tier: str  # "keeper" (every rank from its own node), "peers", "storage" or "none"
    reason: str
    sources: dict[int, Source] = field(default_factory=dict)  # memory tiers only
    tiers: list[str] = field(default_factory=list)  # per rank: keeper | peers | peers (erasure decode) | storage


def plan_restore(inventories: list[dict[str, Any]], nodes: list[int], k: Optional[int],
                 stored: Optional[int]) -> RestorePlan:
    """The plan for ranks on `nodes` (node of each rank) from keeper `inventories` ({"node", "data":
    {rank: {step: slot}}, "parity": [{"gid", "j", "step", "members", ...}]}), erasure code width `k`
    (None: no coding) and the newest verified stored step."""
    world = len(nodes)
    step, sources = newest_in_memory(inventories, nodes, k)
    if step is not None and (stored is None or step >= stored):
        tiers = [_tier(sources[rank], nodes[rank]) for rank in range(world)]
        reason = f"step {step} is complete in keeper memory for all {world} ranks"
        if stored is not None:
            reason += f"; storage's newest is step {stored}"
        return RestorePlan(step, "keeper" if set(tiers) == {"keeper"} else "peers", reason, sources, tiers)
    if stored is None:
        return RestorePlan(None, "none", f"nothing to restore: no step is complete in the keepers of all ranks "
                                         f"({held(inventories, world)}) and storage holds no verified checkpoint")
    reason = (f"no step newer than {stored} is complete in the keepers of all ranks ({held(inventories, world)})"
              if step is None else f"storage step {stored} is newer than memory step {step}")
    return RestorePlan(stored, "storage", reason, tiers=["storage"] * world)


def newest_in_memory(inventories: list[dict[str, Any]], nodes: list[int], k: Optional[int]
                     ) -> tuple[Optional[int], dict[int, Source]]:
    """The newest step every rank can get from memory, and for each rank where."""
    holders: dict[tuple[int, int], int] = {}  # (rank, step) -> a node holding the block, its own preferred
    parity: dict[tuple[int, int], list[dict[str, Any]]] = {}  # (rank, step) -> complete parity entries
    for inventory in inventories:
        for rank, steps in inventory["data"].items():
            for step in steps:
                if holders.get((rank, step)) != nodes[rank]:
                    holders[(rank, step)] = inventory["node"]
        for entry in inventory["parity"]:
            for rank in entry["members"]:
                parity.setdefault((rank, entry["step"]), []).append(entry)
    for step in sorted({s for _, s in holders} | {s for _, s in parity}, reverse=True):
        sources: dict[int, Source] = {}
        for rank in range(len(nodes)):
            if (rank, step) in holders:
                sources[rank] = ("data", holders[(rank, step)])
            elif _decodable(parity.get((rank, step), []), step, holders, k):
                sources[rank] = ("decode", None)
            else:
                break
        else:
            return step, sources
    return None, {}


def _decodable(entries: list[dict[str, Any]], step: int, holders: dict[tuple[int, int], int],
               k: Optional[int]) -> bool:
    """A group's lost block is rebuilt from any k of its blocks: surviving members' data, the virtual zero
    members of a short group, and its distinct parity blocks."""
    if not entries or k is None:
        return False
    members = entries[0]["members"]
    have = sum((r, step) in holders for r in members) + (k - len(members)) + len({e["j"] for e in entries})
    return have >= k


def _tier(source: Source, node: int) -> str:
    kind, holder = source
    if kind == "decode":
        return "peers (erasure decode)"
    return "keeper" if holder == node else "peers"


def held(inventories: list[dict[str, Any]], world: int) -> str:
    """What the keepers hold for this run's layout, per rank: 'rank 0: steps 14, 15; rank 1: none'."""
    steps: dict[int, set[int]] = {}
    for inventory in inventories:
        for rank, held_steps in inventory["data"].items():
            steps.setdefault(rank, set()).update(held_steps)
    return "; ".join(f"rank {r}: " + (f"steps {', '.join(map(str, sorted(steps[r])))}" if steps.get(r) else "none")
                     for r in sorted(steps.keys() | set(range(world))))
