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
from phalanx.checkpoint.wire import WireError
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
        """This rank's state from another layout's blocks of `other.step` in keeper memory (reshard.py), a block
        lost with its node decoded from its erasure group's survivors; None, on every rank, when what is left
        does not hold the whole state (collective)."""
        layouts, problem = {}, None
        decoded = other.decodable()
        for rank, node in [*other.holders.items(), *((r, entries[0][0]) for r, entries in decoded.items())]:
            try:
                reply, _ = self.peers.call(node, "layout", rank=rank, fp=other.fingerprint)
            except WireError as err:
                problem = str(err)
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

        fetched: dict[int, torch.Tensor] = {}  # a member's block a decode read is not read again by the reshard

        def fetch(rank: int) -> torch.Tensor:
            if rank in fetched:
                return fetched[rank]
            if rank not in other.holders:
                codec = ErasureCodec(decoded[rank][0][1]["k"], decoded[rank][0][1]["m"])
                block = decode_member(rank, codec, decoded[rank], lambda r: fetch(r) if r in other.holders else None,
                                      self._parity_fetcher(other.step))
                fetched[rank] = block[: layouts[rank].nbytes]
            else:
                _, payload = self.peers.call(other.holders[rank], "fetch", rank=rank, step=other.step,
                                             fp=other.fingerprint, limit=layouts[rank].nbytes)
                fetched[rank] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            return fetched[rank]

        state, read = reshard(template, layouts, fetch, self.rank_local_keys,
                              prefer=lambda rank: other.holders.get(rank) == self.node)
        held = (f"all {other.world} ranks" if len(other.holders) == other.world else
                f"ranks {', '.join(map(str, other.holders))} of the {other.world} ranks (the others' blocks of it are "
                f"lost or incomplete; " + (f"rank {', '.join(map(str, decoded))} decoded from erasure parity; "
                                           if decoded else "") + "these hold the whole state)")
        reason = (f"step {other.step} is in keeper memory for {held} of the {other.parallel} layout" +
                  (f"; storage's newest is step {stored}" if stored is not None else ""))
        info = {"tier": "keeper (resharded)", "reason": reason, "resharded_from": other.parallel}
        if set(read) & set(decoded):
            info["decoded"] = sorted(set(read) & set(decoded))
        return state, other.step, info

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
        entries = [(inv["node"], e) for inv in everyone for e in inv["parity"]
                   if e["step"] == step and self.rank in e["members"]]

        def member(rank: int) -> Optional[torch.Tensor]:
            kind, node = sources.get(rank, (None, None))
            return self._fetch_block(node, rank, step, measured) if kind == "data" else None

        block = decode_member(self.rank, self.codec, entries, member, self._parity_fetcher(step))
        return block[: measured.layout.nbytes]

    def _parity_fetcher(self, step: int) -> Callable[[int, dict[str, Any]], torch.Tensor]:
        def fetch(node: int, entry: dict[str, Any]) -> torch.Tensor:
            _, payload = self.peers.call(node, "fetch_parity", gid=entry["gid"], j=entry["j"], step=step,
                                         limit=entry["length"])
            return torch.frombuffer(bytearray(payload), dtype=torch.uint8)

        return fetch


def decode_member(rank: int, codec: ErasureCodec, entries: list[tuple[int, dict[str, Any]]],
                  member: Callable[[int], Optional[torch.Tensor]], parity: Callable[[int, dict[str, Any]], torch.Tensor]
                  ) -> torch.Tensor:
    """Rank `rank`'s block rebuilt from its group: `entries` are (node, parity inventory entry) of the group's step,
    `member(r)` a surviving member's block (None if lost), `parity(node, entry)` a parity block; any k of the
    group's blocks, its short group's virtual zero members included, rebuild the rest."""
    members, length = entries[0][1]["members"], entries[0][1]["length"]
    blocks: dict[int, torch.Tensor] = {}
    for index in range(len(members), codec.k):  # the virtual zero members of a short group
        blocks[index] = torch.zeros(length, dtype=torch.uint8)
    for index, other in enumerate(members):
        block = member(other) if other != rank else None
        if block is not None:
            blocks[index] = _padded(block, length)
    for node, entry in entries:
        if len(blocks) >= codec.k:
            break
        if codec.k + entry["j"] not in blocks:
            blocks[codec.k + entry["j"]] = parity(node, entry)
    data = codec.decode(dict(sorted(blocks.items())[: codec.k]) if len(blocks) > codec.k else blocks)
    return data[members.index(rank)].clone()


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
    parity: tuple[tuple[int, dict[str, Any]], ...] = ()  # (node, complete parity entry) of the step

    def decodable(self) -> dict[int, list[tuple[int, dict[str, Any]]]]:
        """Lost rank -> the parity entries of its group that rebuild it from the group's surviving blocks."""
        out = {}
        for rank in range(self.world):
            entries = [(node, e) for node, e in self.parity if rank in e["members"] and e.get("k") and e.get("m")]
            if rank in self.holders or not entries:
                continue
            k, members = entries[0][1]["k"], entries[0][1]["members"]
            have = sum(r in self.holders for r in members) + (k - len(members)) + len({e["j"] for _, e in entries})
            if have >= k:
                out[rank] = entries
        return out


def other_layouts_in_memory(inventories: list[Optional[dict[str, Any]]], mine: Optional[str]) -> list[OtherLayout]:
    """The steps of layouts other than `mine` (fingerprint) of which keepers hold blocks, newest first (the most
    blocks first among equally new ones), from every rank's raw keeper inventory (registered and retired ranks),
    with the parity of each step. Whether a step's blocks hold the whole state is for `reshard.coverage_problem`
    to say (replicas and erasure decodes may stand in for lost ranks)."""
    held: dict[tuple[str, int], dict[int, int]] = {}  # (fingerprint, step) -> {its rank: node}
    parity: dict[tuple[str, int], dict[tuple[int, int], tuple[int, dict]]] = {}  # -> {(gid, j): (node, entry)}
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
        for entry in inventory.get("parity", []):
            if entry.get("fp") and entry["fp"] != mine:
                parity.setdefault((entry["fp"], entry["step"]), {})[(entry["gid"], entry["j"])] = (inventory["node"],
                                                                                                   entry)
    return [OtherLayout(fingerprint, step, dict(sorted(holders.items())), *about[fingerprint],
                        tuple(parity.get((fingerprint, step), {}).values()))
            for (fingerprint, step), holders in sorted(held.items(), key=lambda item: (-item[0][1], -len(item[1])))]


def _padded(block: torch.Tensor, length: int) -> torch.Tensor:
    if block.numel() >= length:
        return block[:length]
    out = torch.zeros(length, dtype=torch.uint8)
    out[: block.numel()] = block
    return out
