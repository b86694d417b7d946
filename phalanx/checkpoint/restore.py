"""Restore: gather what every keeper holds and the newest verified stored step, follow the plan
`restore_plan.plan_restore` makes of them (this node's keeper, a peer's copy, an erasure decode from the
group's survivors, or persistent storage) and say which and why. A stored step any rank refuses is
reported and the plan made again without it."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from phalanx.checkpoint.collectives import CheckpointCollectives
from phalanx.checkpoint.copies import StateFn
from phalanx.checkpoint.erasure import ErasureCodec
from phalanx.checkpoint.flat import FlatLayout
from phalanx.checkpoint.measure import Measurement
from phalanx.checkpoint.peers import PeerKeepers
from phalanx.checkpoint.persistent import CheckpointStore
from phalanx.checkpoint.reshard import coverage_problem, memory_metadata, reshard
from phalanx.checkpoint.restore_plan import RestorePlan, plan_restore
from phalanx.checkpoint.slots import KeeperSlots
from phalanx.checkpoint.untrusted import CheckpointRefused
from phalanx.errors import PhalanxError


class Restorer:
    """The newest usable state for this rank, from keeper memory or storage (collective)."""

    def __init__(self, *, slots: KeeperSlots, peers: PeerKeepers, collectives: CheckpointCollectives,
                 store: CheckpointStore, codec: Optional[ErasureCodec], nodes: list[int], rank: int,
                 rank_local_keys: tuple[str, ...], run_dir: str, event: Callable[..., None], layout: str):
        self.slots, self.peers, self.collectives, self.store, self.codec = slots, peers, collectives, store, codec
        self.nodes, self.node, self.rank = nodes, nodes[rank], rank
        self.world_size, self.is_main = len(nodes), rank == 0
        self.rank_local_keys, self.run_dir, self.event = rank_local_keys, run_dir, event
        self.layout = layout  # this launch's, `Layout.name()`

    def restore(self, template_fn: StateFn, measured: Optional[Measurement]
                ) -> tuple[Optional[dict[str, Any]], Optional[int], dict[str, Any]]:
        """(state, step, info): the newest usable state, from memory if any, else storage. `measured`: the
        layout this launch's blocks have (None: not measured, so no keeper block is usable)."""
        inventories = self.collectives.all_gather(
            self.slots.call("inventory") if self.slots.keeper is not None else None)  # every rank's keeper's
        everyone = [_usable(inventory, node, measured) for inventory, node in zip(inventories, self.nodes)]
        others = other_layouts_in_memory(inventories, measured.fingerprint if measured else None)
        stored = self.collectives.broadcast(self.store.newest_valid(self._skipped) if self.is_main else None)
        refused: list[int] = []
        while True:
            plan = plan_restore(everyone, self.nodes, self.codec.k if self.codec else None, stored)
            if plan.tier in ("keeper", "peers"):
                state = measured.layout.unpack(self._fetch(plan, everyone, measured), template_fn())
                return state, plan.step, {"tier": plan.tier, "tiers": plan.tiers, "reason": plan.reason}
            for other in [o for o in others if stored is None or o.step >= stored]:  # newest first
                resharded = self._reshard_memory(other, template_fn, stored)
                if resharded is not None:
                    return resharded
            others = []
            if plan.tier == "none":
                self._refuse_if_all_refused()
                return None, None, {}
            try:
                state, problem = self.store.load(plan.step, template_fn(), self.rank, self.world_size,
                                                 self.rank_local_keys), None
            except CheckpointRefused as err:
                state, problem = None, str(err)
            problems = [p for p in self.collectives.all_gather(problem) if p]
            if not problems:
                note = f"; refused: step {', '.join(map(str, refused))} (events.jsonl: checkpoint_skipped)"
                return state, plan.step, {"tier": "storage", "reason": plan.reason + (note if refused else ""),
                                          **self._resharded(plan.step)}
            if self.is_main:
                self._skipped(plan.step, problems[0])
            refused.append(plan.step)
            stored = self.collectives.broadcast(self.store.newest_valid(self._skipped, below=plan.step)
                                                if self.is_main else None)

    def _resharded(self, step: int) -> dict[str, Any]:
        """{"resharded_from": the layout that wrote `step`} when it is not this launch's, else {}."""
        manifest = self.store.manifest(step) or {}
        saved = manifest.get("layout") or f"{manifest.get('world_size', '?')} ranks (layout not recorded)"
        return {} if saved == self.layout else {"resharded_from": saved}

    def _reshard_memory(self, other: "OtherLayout", template_fn: StateFn, stored: Optional[int]
                        ) -> Optional[tuple[dict[str, Any], int, dict[str, Any]]]:
        """This rank's state from another layout's blocks of `other.step` in keeper memory (reshard.py); None,
        on every rank, when the blocks left do not hold the whole state (collective)."""
        layouts, problem = {}, None
        for rank, node in other.holders.items():
            reply, _ = self.peers.call(node, "layout", rank=rank, fp=other.fingerprint)
            if "error" in reply:
                problem = reply["error"]
                break
            layouts[rank] = FlatLayout.from_json(reply["layout"])
        template = template_fn()
        if problem is None:
            problem = coverage_problem(template, memory_metadata(layouts)[0], self.rank_local_keys)
        problems = [p for p in self.collectives.all_gather(problem) if p]
        if problems:
            if self.is_main:
                self.event("reshard_skipped", step=other.step, from_layout=other.parallel, problem=problems[0])
            return None

        def fetch(rank: int) -> torch.Tensor:
            _, payload = self.peers.call(other.holders[rank], "fetch", rank=rank, step=other.step,
                                         fp=other.fingerprint, limit=layouts[rank].nbytes)
            return torch.frombuffer(bytearray(payload), dtype=torch.uint8)

        state, read = reshard(template, layouts, fetch, self.rank_local_keys,
                              prefer=lambda rank: other.holders[rank] == self.node)
        held = (f"all {other.world} ranks" if len(other.holders) == other.world else
                f"ranks {', '.join(map(str, other.holders))} of the {other.world} ranks (the others' blocks of it are "
                f"lost or incomplete; these hold the whole state)")
        reason = (f"step {other.step} is in keeper memory for {held} of the {other.parallel} layout" +
                  (f"; storage's newest is step {stored}" if stored is not None else ""))
        return state, other.step, {"tier": "keeper (resharded)", "reason": reason,
                                   "resharded_from": other.parallel}

    def _refuse_if_all_refused(self) -> None:
        """A run whose storage holds committed checkpoints, none of them usable, does not start over on top of
        them (retention would delete them): the user decides. Collective."""
        refused = None
        if self.is_main:
            kept = [s for s in self.store.step_dirs() if self.store.fs.exists(f"{self.store.path(s)}/manifest.json")]
            if kept:
                refused = (f"none of the {len(kept)} persisted checkpoints in {self.store.url} can be used (steps "
                           f"{', '.join(map(str, kept))}; events.jsonl says why each was refused) and nothing was "
                           f"overwritten: adopt one you trust with `phalanx ckpt verify {self.run_dir} --step N "
                           f"--trust`, or start a new run beside it with run.resume=false")
        refused = self.collectives.broadcast(refused)
        if refused:
            raise PhalanxError(refused)

    def _skipped(self, step: int, problem: str) -> None:
        warnings.warn(f"checkpoint step-{step} skipped: {problem}", stacklevel=2)
        self.event("checkpoint_skipped", step=step, problem=problem)

    def _fetch(self, plan: RestorePlan, everyone: list[dict], measured: Measurement) -> torch.Tensor:
        """This rank's block of the plan's step: a copy of its own slot, a peer's copy, or an erasure decode."""
        rank, step = self.rank, plan.step
        kind, node = plan.sources[rank]
        if kind == "data" and node == self.node:
            mine = next(inv for inv in everyone if inv["node"] == self.node)
            return self.slots.blocks[mine["data"][rank][step]].clone()
        if kind == "data":
            return self._fetch_block(node, rank, step, measured)
        return self._decode(step, everyone, plan.sources, measured)

    def _fetch_block(self, node: int, rank: int, step: int, measured: Measurement) -> torch.Tensor:
        _, payload = self.peers.call(node, "fetch", rank=rank, step=step, limit=measured.block_lengths[rank])
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8)

    def _decode(self, step: int, everyone: list[dict], sources: dict, measured: Measurement) -> torch.Tensor:
        rank, k = self.rank, self.codec.k
        entries = [(inv["node"], e) for inv in everyone for e in inv["parity"]
                   if e["step"] == step and rank in e["members"]]
        members, length = entries[0][1]["members"], entries[0][1]["length"]
        blocks: dict[int, torch.Tensor] = {}
        for index in range(len(members), k):  # the virtual zero members of a short group
            blocks[index] = torch.zeros(length, dtype=torch.uint8)
        for index, member in enumerate(members):
            kind, node = sources.get(member, (None, None))
            if member != rank and kind == "data":
                block = self._fetch_block(node, member, step, measured)
                blocks[index] = _padded(block, length)
        for node, entry in entries:
            if len(blocks) >= k:
                break
            _, payload = self.peers.call(node, "fetch_parity", gid=entry["gid"], j=entry["j"], step=step,
                                         limit=max(measured.block_lengths[m] for m in members))
            blocks[k + entry["j"]] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        data = self.codec.decode(dict(sorted(blocks.items())[:k]) if len(blocks) > k else blocks)
        return data[members.index(rank)][: measured.layout.nbytes].clone()


def _usable(inventory: Optional[dict[str, Any]], node: int, measured: Optional[Measurement]) -> dict[str, Any]:
    """What a keeper's inventory holds of blocks with this launch's fingerprint (`plan_restore`'s input)."""
    if inventory is None or measured is None:
        return {"node": node, "data": {}, "parity": []}
    data = {int(r): {step: slot for step, slot in held["steps"]} for r, held in inventory["data"].items()
            if held["fp"] == measured.fingerprint}
    parity = [entry for entry in inventory["parity"] if entry["fp"] == measured.fingerprint]
    return {"node": node, "data": data, "parity": parity}


@dataclass(frozen=True)
class OtherLayout:
    """The newest step another layout snapshotted that some keeper still holds blocks of."""

    fingerprint: str
    step: int
    holders: dict[int, int]  # its rank -> a node whose keeper holds that rank's block of the step
    world: int  # its ranks: the blocks of those not in `holders` were lost
    parallel: str  # its `Layout.name()`


def other_layouts_in_memory(inventories: list[Optional[dict[str, Any]]], mine: Optional[str]) -> list[OtherLayout]:
    """The steps of layouts other than `mine` (fingerprint) of which keepers hold blocks, newest first (the most
    blocks first among equally new ones), from every rank's raw keeper inventory (registered and retired ranks).
    Whether a step's blocks hold the whole state is for `reshard.coverage_problem` to say (replicas may stand in
    for lost ranks)."""
    held: dict[tuple[str, int], dict[int, int]] = {}  # (fingerprint, step) -> {its rank: node}
    about: dict[str, tuple[int, str]] = {}  # fingerprint -> (world, parallel)
    for inventory in inventories:
        if inventory is None:
            continue
        entries = [{"rank": int(r), **e} for r, e in inventory["data"].items()] + inventory.get("retired", [])
        for entry in entries:
            if not entry.get("fp") or entry["fp"] == mine or not entry.get("world"):
                continue
            about[entry["fp"]] = (entry["world"], entry.get("parallel") or f"{entry['world']}-rank")
            for step, _slot in entry["steps"]:
                held.setdefault((entry["fp"], step), {})[entry["rank"]] = inventory["node"]
    return [OtherLayout(fingerprint, step, dict(sorted(holders.items())), *about[fingerprint])
            for (fingerprint, step), holders in sorted(held.items(), key=lambda item: (-item[0][1], -len(item[1])))]


def _padded(block: torch.Tensor, length: int) -> torch.Tensor:
    if block.numel() >= length:
        return block[:length]
    out = torch.zeros(length, dtype=torch.uint8)
    out[: block.numel()] = block
    return out
