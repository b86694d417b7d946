"""Restore: gather what every keeper holds and the newest verified stored step, follow the plan
`restore_plan.plan_restore` makes of them (this node's keeper, a peer's copy, an erasure decode from the
group's survivors, or persistent storage) and say which and why. A stored step any rank refuses is
reported and the plan made again without it."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch

from phalanx.checkpoint.collectives import CheckpointCollectives
from phalanx.checkpoint.copies import StateFn
from phalanx.checkpoint.erasure import ErasureCodec
from phalanx.checkpoint.measure import Measurement
from phalanx.checkpoint.peers import PeerKeepers
from phalanx.checkpoint.persistent import CheckpointStore
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
        everyone = self.collectives.all_gather(self._inventory(measured))
        stored = self.collectives.broadcast(self.store.newest_valid(self._skipped) if self.is_main else None)
        refused: list[int] = []
        while True:
            plan = plan_restore(everyone, self.nodes, self.codec.k if self.codec else None, stored)
            if plan.tier in ("keeper", "peers"):
                state = measured.layout.unpack(self._fetch(plan, everyone, measured), template_fn())
                return state, plan.step, {"tier": plan.tier, "tiers": plan.tiers, "reason": plan.reason}
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

    def _inventory(self, measured: Optional[Measurement]) -> dict[str, Any]:
        """What this rank's keeper holds of blocks with this launch's fingerprint."""
        if self.slots.keeper is None or measured is None:
            return {"node": self.node, "data": {}, "parity": []}
        inventory = self.slots.call("inventory")
        data = {int(r): {step: slot for step, slot in held["steps"]} for r, held in inventory["data"].items()
                if held["fp"] == measured.fingerprint}
        parity = [entry for entry in inventory["parity"] if entry["fp"] == measured.fingerprint]
        return {"node": self.node, "data": data, "parity": parity}

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


def _padded(block: torch.Tensor, length: int) -> torch.Tensor:
    if block.numel() >= length:
        return block[:length]
    out = torch.zeros(length, dtype=torch.uint8)
    out[: block.numel()] = block
    return out
