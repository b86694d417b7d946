"""The snapshot engine: every step's whole Trainer state into keeper memory, off the training path.

After optimizer step S the state is immutable until step S+1's optimizer step (DataStates-LLM), so
`snapshot(S)` only writes the small JSON skeleton and hands the tensor copies to a background
worker (on CUDA a side stream into page-locked memory); `wait_copied()` before the next optimizer
step is the only place training can wait. The worker then marks the block complete in the keeper,
sends this rank's parity contributions to the keepers holding its erasure group's parity, and
agrees with every rank on a gloo group of its own (never the training collectives) that step S is
complete everywhere: that is the commit. Persistence of a committed step is the keeper's job.

`restore()` gathers what every keeper holds and the newest verified stored step, and follows the plan
`restore_plan.plan_restore` makes of them: local keeper, peers (another keeper, or an erasure decode
from the group's survivors), or persistent storage, saying which and why.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import datetime
import hashlib
import json
import mmap
import os
import socket
import threading
import time
import warnings
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from phalanx.checkpoint.erasure import ErasureCodec
from phalanx.checkpoint.flat import FlatLayout, encode_values, flatten_state_dict, local_chunk, mapping_json
from phalanx.checkpoint.groups import ErasureGroup, erasure_groups
from phalanx.checkpoint.link import connect_keeper, default_keeper_dir, find_keeper, keeper_host, run_identity
from phalanx.checkpoint.persistent import CheckpointStore, persist_plan
from phalanx.checkpoint.restore_plan import RestorePlan, plan_restore
from phalanx.checkpoint.signing import signing_key
from phalanx.checkpoint.untrusted import CheckpointRefused
from phalanx.checkpoint.wire import KeeperClient, WireError
from phalanx.errors import PhalanxError
from phalanx.launch.dist import DistContext

StateFn = Callable[[], dict[str, Any]]


def checkpoint_group(ctx: DistContext, timeout_s: float) -> Optional[Any]:
    """The checkpoint's gloo group. Made before any back end builds its own groups: created after
    DeepSpeed's initialize, it changed ZeRO-2's second-step loss on 2 gloo ranks (reproduced, not
    yet explained)."""
    if not ctx.distributed:
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def node_ids(ctx: DistContext, simulate: int, group: Optional[Any]) -> list[int]:
    """Node index of every rank: `simulate` nodes in contiguous rank blocks, else the launcher's
    (PHALANX_NODE, set by the Ray controller), else by host name."""
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


class SnapshotEngine:
    """One per rank. Collective methods (setup, restore, close) are called by every rank together."""

    def __init__(self, cfg: Any, ctx: DistContext, run_dir: str, state_fn: StateFn,
                 rank_local_keys: tuple[str, ...], event: Callable[..., None], light_fn: Optional[StateFn] = None,
                 group: Optional[Any] = None):
        self.cfg, self.ctx, self.run_dir, self.state_fn = cfg.checkpoint, ctx, run_dir, state_fn
        self.light_fn = light_fn  # the cheap, changing part of the state (see _cache_sources)
        self._cache: Optional[dict[str, Any]] = None
        self._snapshots = 0
        self._reserved: dict[int, int] = {}  # step -> keeper slot begun for it in advance
        self._slot_views: dict[int, list[torch.Tensor]] = {}
        self._started = False  # keepers started and addresses exchanged (at the first snapshot)
        self.rank_local_keys, self.event = rank_local_keys, event
        self.timeout = cfg.fault.collective_timeout_s
        self.group = group  # the checkpoint's own gloo group: commits and plans never queue behind training
        identity = (*run_identity(run_dir, self.cfg.key_file), os.urandom(8).hex()) if ctx.is_main else None
        self.run_id, self.secret, self.epoch = self._broadcast(identity)  # epoch: this launch
        self.nodes = node_ids(ctx, self.cfg.simulate_nodes, self.group)
        self.node = self.nodes[ctx.rank]
        self.keeper_dir = self.cfg.keeper_dir or default_keeper_dir()
        self.host = keeper_host(self.cfg.keeper_host)
        self.store = CheckpointStore(self.cfg.storage or os.path.join(run_dir, "checkpoints"),
                                     key=signing_key(self.secret) if self.cfg.sign else None, run_hint=run_dir)
        self.groups, self.erasure_reason = erasure_groups(self.nodes, self.cfg.erasure_k, self.cfg.erasure_m)
        self.codec = ErasureCodec(self.cfg.erasure_k, self.cfg.erasure_m) if self.groups else None
        self.my_group, self.my_index = next(((g, g.members.index(ctx.rank)) for g in self.groups
                                             if ctx.rank in g.members), (None, -1))
        self.layout: Optional[FlatLayout] = None
        self.keeper: Optional[KeeperClient] = None
        self.blocks: list[torch.Tensor] = []
        self._maps: list[mmap.mmap] = []
        self._pinned: list[int] = []  # cudaHostRegister'ed slot addresses
        self._pin_warned = False
        self._stream: Optional[Any] = None  # the side stream of device-to-host snapshot copies (GPU)
        self._copied_event: Optional[Any] = None
        self.lock = threading.Lock()  # one request at a time on the keeper connection
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="phalanx-snapshot")
        self.job: Optional[concurrent.futures.Future] = None
        self.copied = threading.Event()
        self.copied.set()
        self.committed: Optional[int] = None
        self.fingerprint = ""
        self.block_lengths: list[int] = []
        self.addresses: dict[int, tuple[str, int]] = {}  # node -> keeper address
        self.peers: dict[int, KeeperClient] = {}
        self.last_error: Optional[str] = None
        self.persist_requested: set[int] = set()
        self.stall_s = 0.0  # main-thread seconds spent in snapshot() and wait_copied()

    # ---- collectives on the checkpoint group -----------------------------------------------

    def _broadcast(self, obj: Any) -> Any:
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _all_gather(self, obj: Any) -> list[Any]:
        if self.group is None:
            return [obj]
        out: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    # ---- setup ---------------------------------------------------------------------------

    def setup(self, measure: bool = True) -> None:
        """Measure the state layout, attach to the keeper, agree on the persistence plan (collective).
        `measure=False` defers the state measurement to the first snapshot or memory restore (a back end
        whose state_dict() must not be taken before training starts)."""
        # A keeper left by an earlier launch holds its memory: attach now, for restore. Otherwise
        # the keeper starts with the first snapshot (a trainer that never snapshots never starts one).
        self.keeper = find_keeper(self.run_id, self.secret, self.node, self.keeper_dir, self.timeout)
        if measure:
            self._ensure_measured()
        self._gather_addresses()

    def _ensure_measured(self) -> None:
        """The layout is known and this rank registered with its keeper, if any (collective)."""
        if self.layout is not None:
            return
        self._measure(self.state_fn())
        if self.keeper is not None:
            self._attach(self._plan)

    def _measure(self, state: dict[str, Any]) -> None:
        """The layout, persistence plan and fingerprint of `state` (collective)."""
        self.layout = FlatLayout.of(state)
        plan = persist_plan(state, self.layout, self.rank_local_keys, self.ctx.rank, self._all_gather)
        layouts = self._all_gather([self.layout.nbytes, json.dumps(self.layout.to_json(), sort_keys=True)])
        self.block_lengths = [n for n, _ in layouts]
        # Blocks are usable by any launch with the same ranks and layouts, wherever the ranks now run.
        digest = hashlib.sha256(json.dumps([self.ctx.world_size, self.cfg.erasure_k, self.cfg.erasure_m,
                                            layouts]).encode())
        self.fingerprint = digest.hexdigest()[:16]
        plan["fingerprint"] = self.fingerprint
        self._plan = plan
        self._cache = self._cache_sources(state)

    def _gather_addresses(self) -> None:
        """Every node's keeper address (collective)."""
        mine = self._address() if self.keeper is not None else None
        self.addresses = {n: tuple(a) for n, a in self._all_gather((self.node, mine)) if a is not None}

    def _ensure_keepers(self) -> None:
        """Before the first snapshot (every rank at once): a keeper on every node, and their addresses."""
        if self._started:
            return
        if self.keeper is None:
            self._attach(self._plan)
        self._gather_addresses()
        self._started = True

    def _address(self) -> tuple[str, int]:
        host, port = self.keeper.address.rsplit(":", 1)
        return host, int(port)

    def _attach(self, plan: dict[str, Any]) -> None:
        if self.keeper is None:
            self.keeper = connect_keeper(self.run_dir, self.run_id, self.secret, self.node, self.host,
                                         self.keeper_dir, self.cfg.keeper_linger_s, self.timeout)
        # Every rank's block length bounds what this keeper accepts, parity of any group included
        largest = max(self.block_lengths) if self.block_lengths else self.layout.nbytes
        reply, _ = self.keeper.call("register", rank=self.ctx.rank, nbytes=self.layout.nbytes, plan=plan,
                                    max_block=largest)
        self._unmap()
        for path in reply["paths"]:
            with open(path, "r+b") as f:
                self._maps.append(mmap.mmap(f.fileno(), self.layout.nbytes))
            self.blocks.append(torch.frombuffer(self._maps[-1], dtype=torch.uint8))
        self._plan = plan
        if self.ctx.device.type == "cuda":  # page-locked, so device-to-host copies run at full speed
            for block in self.blocks:
                self._pin(block)

    def _pin(self, block: torch.Tensor) -> None:
        code = torch.cuda.cudart().cudaHostRegister(block.data_ptr(), block.numel(), 0)
        code = int(getattr(code, "value", code))
        if code == 0:
            self._pinned.append(block.data_ptr())
        elif not self._pin_warned:
            self._pin_warned = True
            self.event("snapshot_unpinned", rank=self.ctx.rank, cuda_error=code)
            warnings.warn(f"phalanx: page-locking the keeper's shared memory failed (cudaHostRegister error {code}; "
                          f"directory {self.keeper_dir}): snapshot copies from the GPU run at pageable speed and "
                          f"the training thread waits for them. Give the keeper a directory on tmpfs "
                          f"(checkpoint.keeper_dir, default /dev/shm) and raise the locked-memory limit "
                          f"(ulimit -l).", RuntimeWarning, stacklevel=3)

    def _unmap(self) -> None:
        """Unregister and unmap the current slots (a re-registration replaces them)."""
        for ptr in self._pinned:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self._pinned = []
        self.blocks, self._slot_views = [], {}
        for old in self._maps:
            try:
                old.close()
            except BufferError:  # a tensor still views it (a restore in flight): the map closes when it goes
                pass
        self._maps = []

    def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        with self.lock:
            return self.keeper.call(op, **fields)[0]

    # ---- snapshots -----------------------------------------------------------------------

    def _cache_sources(self, state: dict[str, Any]) -> Optional[dict[str, Any]]:
        """Skip the full `state_fn()` per snapshot when it is safe: parameters and optimizer moments
        are updated in place, so the tensors a state dict points at are the same every step. Two
        calls must return the same storage for every tensor outside `light_fn()`'s keys, and
        `light_fn()` must cover every other value (step, schedule, data position, RNG, the optimizer's
        param_groups); back ends that hand out copies (ZeRO-3 gathers) keep the full call."""
        if self.light_fn is None:
            return None
        light, _ = flatten_state_dict(self.light_fn())
        flat, _ = flatten_state_dict(state)
        again, _ = flatten_state_dict(self.state_fn())
        if not set(light) <= set(flat):
            return None
        for fqn, value in flat.items():
            if fqn in light:
                continue
            if isinstance(value, torch.Tensor):
                mine, other = local_chunk(value)[0], local_chunk(again[fqn])[0]
                if mine.data_ptr() != other.data_ptr() or mine.shape != other.shape:
                    return None
            elif fqn not in again or encode_values({fqn: value}) != encode_values({fqn: again[fqn]}):
                return None
        if encode_values({k: v for k, v in light.items()}) != encode_values({k: flat[k] for k in light}):
            return None  # the light values must be the very ones the state dict holds
        index = {leaf.fqn: i for i, leaf in enumerate(self.layout.leaves)}
        return {"values": encode_values(flat), "sources": self.layout.tensors(state),
                "volatile": {fqn: index[fqn] for fqn, v in light.items() if isinstance(v, torch.Tensor)},
                "mapping": mapping_json(state)}

    def state_replaced(self) -> None:
        """After a load: optimizers load into new tensors, so the cached sources are found again."""
        if self.light_fn is not None:
            self._cache = self._cache_sources(self.state_fn())

    def _relayout_if_grown(self) -> Optional[dict[str, Any]]:
        """Without cached sources, the state of this snapshot — measured again, on every rank at once,
        when any rank's grew (DeepSpeed creates its optimizer moments at the first step)."""
        if self._cache is not None:
            return None
        state = self.state_fn()
        grown = torch.tensor([0 if self.layout.matches(state) else 1])
        if self.group is not None:  # the worker is idle here (finish() ran): the group is free
            dist.all_reduce(grown, op=dist.ReduceOp.MAX, group=self.group)
        if int(grown):
            self._measure(state)
            self._reserved = {}
            if self.keeper is not None:
                self._attach(self._plan)  # the keeper makes slots of the new size
        return state

    def _sources(self, block: torch.Tensor, state: Optional[dict[str, Any]] = None
                 ) -> tuple[list[torch.Tensor], Optional[Callable[[], None]]]:
        """(tensors to copy into `block`, the skeleton writer for the background worker, or None when the
        skeleton is already written). With cached sources the training thread only captures the
        changing values (`light_fn()`); encoding them is left to the worker."""
        self._snapshots += 1
        if self._cache is not None and self._snapshots % 100 == 0:  # re-check the in-place assumption
            self._cache = self._cache_sources(self.state_fn())
        if self._cache is None:
            state = state if state is not None else self.state_fn()
            if not self.layout.matches(state):
                raise PhalanxError("the trainer state changed shape between steps; snapshots need a fixed layout "
                                   "(a strategy that adds state lazily must create it before the first step)")
            self.layout.write_skeleton(block, state)
            return self.layout.tensors(state), None
        light, _ = flatten_state_dict(self.light_fn())
        sources = list(self._cache["sources"])
        for fqn, i in self._cache["volatile"].items():
            sources[i] = local_chunk(light[fqn])[0]

        def write_skeleton() -> None:
            values = {**self._cache["values"], **encode_values(light)}
            self.layout.write_skeleton_bytes(block, b'{"values":' + json.dumps(values, separators=(",", ":")).encode()
                                             + b',"mapping":' + self._cache["mapping"] + b"}")

        return sources, write_skeleton

    def _views(self, slot: int) -> list[torch.Tensor]:
        if slot not in self._slot_views:
            self._slot_views[slot] = self.layout.views(self.blocks[slot])
        return self._slot_views[slot]

    def snapshot(self, step: int, persist: bool = False) -> None:
        """Start the snapshot of the state after step `step`; returns once the copy is handed to the worker."""
        start = time.perf_counter()
        self.finish()
        self._ensure_measured()
        self._ensure_keepers()
        state = self._relayout_if_grown()
        try:
            slot = self._reserved.pop(step, None)
            if slot is None:
                slot = self._call("begin", rank=self.ctx.rank, step=step)["slot"]
        except WireError as err:  # the keeper died: start another one; this step's snapshot is lost
            self._lost(step, err)
            return
        (sources, write_skeleton), views = self._sources(self.blocks[slot], state), self._views(slot)
        self.copied.clear()
        ready = None  # on a GPU: the point of the compute stream the copies start after (this step's update)
        if self.ctx.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.ctx.device))
        self.job = self.worker.submit(self._complete, step, slot, sources, views, ready, persist, write_skeleton)
        self.stall_s += time.perf_counter() - start

    def wait_copied(self) -> None:
        """Before the optimizer changes the state: the copy of the last snapshot must be done."""
        if not self.copied.is_set():
            start = time.perf_counter()
            if not self.copied.wait(self.timeout):
                raise PhalanxError(f"a snapshot copy did not finish within fault.collective_timeout_s="
                                   f"{self.timeout:.0f}s")
            self.stall_s += time.perf_counter() - start

    def finish(self) -> Optional[int]:
        """Wait for the running snapshot job (commit included); returns the newest committed step."""
        if self.job is not None:
            job, self.job = self.job, None
            job.result(timeout=self.timeout)
        return self.committed

    def _complete(self, step: int, slot: int, sources: list[torch.Tensor], views: list[torch.Tensor],
                  ready: Optional[Any], persist: bool, write_skeleton: Optional[Callable[[], None]]) -> None:
        ok = True
        # The copy first, and nothing else that needs the GIL until it is done: this thread starts as the
        # training thread launches the next step, which must not wait for the GIL then.
        try:
            if ready is not None:
                self._copy_from_device(views, sources, ready)
                self._copied_event.synchronize()  # a blocking-sync event: this thread sleeps, it does not spin
            else:
                _copy_serial(views, sources)
        finally:
            self.copied.set()
        if write_skeleton is not None:  # from values captured by snapshot(): the state may move on now
            write_skeleton()
        try:
            self._call("complete", rank=self.ctx.rank, slot=slot, step=step)
            if self.my_group is not None:
                self._send_parity(step, self.blocks[slot])
        except (WireError, PhalanxError) as err:
            ok, self.last_error = False, str(err)
        # One all-reduce commits the step (complete on every rank) and, for a persist step, asks whether
        # any keeper is still writing the last one: then this step is not persisted (a lazy tier backs off).
        busy = persist and ok and self._persist_busy()
        done = torch.tensor([step if ok else -1, -1 if busy else 0], dtype=torch.int64)
        if self.group is not None:
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self.group)
        if int(done[0]) != step:
            self.event("snapshot_failed", step=step, rank=self.ctx.rank, error=self.last_error)
            return
        self.committed = step
        if persist and int(done[1]) == 0:
            self._request_persist(step)
        elif persist and self.ctx.is_main:
            self.event("persist_skipped", step=step, reason="the previous persistent checkpoint is still being written")
        if self.cfg.snapshot_every:  # the next snapshot's slot, reserved off the training thread
            upcoming = step + self.cfg.snapshot_every
            try:
                self._reserved = {upcoming: self._call("begin", rank=self.ctx.rank, step=upcoming)["slot"]}
            except (WireError, PhalanxError):
                self._reserved = {}

    def _copy_from_device(self, views: list[torch.Tensor], sources: list[torch.Tensor], ready: Any) -> None:
        """Queue the device-to-host copies on the snapshot stream, after `ready`. Launched here, off the
        training thread (a thousand launches cost it milliseconds a step); the next optimizer step waits
        for `copied` all the same."""
        with torch.cuda.device(self.ctx.device):
            if self._stream is None:
                self._stream = torch.cuda.Stream(self.ctx.device)
                self._copied_event = torch.cuda.Event(blocking=True)
            self._stream.wait_event(ready)
            with torch.cuda.stream(self._stream), torch.no_grad():  # no detach(): fewer Python objects per step
                torch._foreach_copy_(views, sources, non_blocking=True)
                self._copied_event.record(self._stream)

    def _send_parity(self, step: int, block: torch.Tensor) -> None:
        group = self.my_group
        length = max(self.block_lengths[r] for r in group.members)
        for j, contribution in enumerate(self.codec.parity_contributions(self.my_index, block)):
            node = group.parity_nodes[j]
            self._peer(node).call("parity_add", payload=memoryview(contribution.numpy()), gid=group.gid, j=j,
                                  step=step, index=self.my_index, members=list(group.members), length=length,
                                  k=self.codec.k, fp=self.fingerprint, epoch=self.epoch)

    def _peer(self, node: int) -> KeeperClient:
        if node == self.node:
            return self.keeper
        if node not in self.peers:
            host, port = self.addresses[node]
            self.peers[node] = KeeperClient(host, port, self.secret, self.timeout)
        return self.peers[node]

    def _lost(self, step: int, err: Exception) -> None:
        self.event("keeper_lost", step=step, rank=self.ctx.rank, node=self.node, error=str(err))
        self.keeper.close()
        self.keeper = None
        self._attach(self._plan)

    # ---- persistence ---------------------------------------------------------------------

    def _persist_busy(self) -> bool:
        try:
            return bool(self._call("persist_busy", rank=self.ctx.rank)["busy"])
        except WireError:
            return True

    def _request_persist(self, step: int) -> None:
        if step in self.persist_requested:
            return
        self.persist_requested.add(step)
        self._call("persist", rank=self.ctx.rank, step=step, storage=self.store.url,
                   world_size=self.ctx.world_size, coordinator=self.ctx.rank == 0, timeout_s=self.timeout,
                   keep_last=self.cfg.keep_last, info={"world_size": self.ctx.world_size}, sign=self.cfg.sign)

    def persist_and_wait(self, step: int) -> Optional[str]:
        """Snapshot `step` if needed, persist it, wait until this rank's part (rank 0: the manifest) is
        written; returns the checkpoint path on rank 0. Collective."""
        if self.finish() != step:
            self.snapshot(step)
            if self.finish() != step:
                raise PhalanxError(f"the snapshot of step {step} did not commit ({self.last_error}); see events.jsonl")
        deadline = time.monotonic() + self.timeout
        while step not in self.persist_requested and self._persist_busy():  # an earlier write finishes first
            if time.monotonic() > deadline:
                raise PhalanxError(f"an earlier persistent write did not finish within {self.timeout:.0f}s")
            time.sleep(0.02)
        if self.group is not None:  # every rank's keeper is free before any is asked
            dist.barrier(group=self.group)
        self._request_persist(step)
        while time.monotonic() < deadline:
            status = self._call("persist_status", rank=self.ctx.rank, step=step)
            if status.get("done"):
                if "error" in status:
                    raise PhalanxError(f"persisting step {step} failed in the keeper: {status['error']}")
                return status.get("path")
            time.sleep(0.02)
        raise PhalanxError(f"persisting step {step} did not finish within {self.timeout:.0f}s")

    # ---- restore -------------------------------------------------------------------------

    def restore(self, template_fn: StateFn) -> tuple[Optional[dict[str, Any]], Optional[int], dict[str, Any]]:
        """(state, step, info): the newest usable state, from memory if any, else storage (`restore_plan`).
        A stored step any rank refuses is reported and the plan made again without it. Collective."""
        if self.layout is None and any(self._all_gather(self.keeper is not None)):
            self._ensure_measured()  # some keeper may hold this run's memory: its blocks need the layout
        everyone = self._all_gather(self._inventory())
        stored = self._broadcast(self.store.newest_valid(self._skipped) if self.ctx.is_main else None)
        refused: list[int] = []
        while True:
            plan = plan_restore(everyone, self.nodes, self.codec.k if self.codec else None, stored)
            if plan.tier in ("keeper", "peers"):
                state = self.layout.unpack(self._fetch(plan, everyone), template_fn())
                return state, plan.step, {"tier": plan.tier, "tiers": plan.tiers, "reason": plan.reason}
            if plan.tier == "none":
                self._refuse_if_all_refused()
                return None, None, {}
            try:
                state, problem = self.store.load(plan.step, template_fn(), self.ctx.rank, self.ctx.world_size,
                                                 self.rank_local_keys), None
            except CheckpointRefused as err:
                state, problem = None, str(err)
            problems = [p for p in self._all_gather(problem) if p]
            if not problems:
                note = f"; refused: step {', '.join(map(str, refused))} (events.jsonl: checkpoint_skipped)"
                return state, plan.step, {"tier": "storage", "reason": plan.reason + (note if refused else "")}
            if self.ctx.is_main:
                self._skipped(plan.step, problems[0])
            refused.append(plan.step)
            stored = self._broadcast(self.store.newest_valid(self._skipped, below=plan.step)
                                     if self.ctx.is_main else None)

    def _refuse_if_all_refused(self) -> None:
        """A run whose storage holds committed checkpoints, none of them usable, does not start over on top of
        them (retention would delete them): the user decides. Collective."""
        refused = None
        if self.ctx.is_main:
            kept = [s for s in self.store.step_dirs() if self.store.fs.exists(f"{self.store.path(s)}/manifest.json")]
            if kept:
                refused = (f"none of the {len(kept)} persisted checkpoints in {self.store.url} can be used (steps "
                           f"{', '.join(map(str, kept))}; events.jsonl says why each was refused) and nothing was "
                           f"overwritten: adopt one you trust with `phalanx ckpt verify {self.run_dir} --step N "
                           f"--trust`, or start a new run beside it with run.resume=false")
        refused = self._broadcast(refused)
        if refused:
            raise PhalanxError(refused)

    def _skipped(self, step: int, problem: str) -> None:
        import warnings

        warnings.warn(f"checkpoint step-{step} skipped: {problem}", stacklevel=2)
        self.event("checkpoint_skipped", step=step, problem=problem)

    def _inventory(self) -> dict[str, Any]:
        if self.keeper is None or self.layout is None:
            return {"node": self.node, "data": {}, "parity": []}
        inventory = self._call("inventory")
        data = {int(r): {step: slot for step, slot in held["steps"]} for r, held in inventory["data"].items()
                if held["fp"] == self.fingerprint}
        parity = [entry for entry in inventory["parity"] if entry["fp"] == self.fingerprint]
        return {"node": self.node, "data": data, "parity": parity}

    def _fetch(self, plan: RestorePlan, everyone: list[dict]) -> torch.Tensor:
        """This rank's block of the plan's step: a copy of its own slot, a peer's copy, or an erasure decode."""
        rank, step = self.ctx.rank, plan.step
        kind, node = plan.sources[rank]
        if kind == "data" and node == self.node:
            mine = next(inv for inv in everyone if inv["node"] == self.node)
            return self.blocks[mine["data"][rank][step]].clone()
        if kind == "data":
            return self._fetch_block(node, rank, step)
        return self._decode(step, everyone, plan.sources)

    def _fetch_block(self, node: int, rank: int, step: int) -> torch.Tensor:
        header, payload = self._peer(node).call("fetch", rank=rank, step=step, limit=self.block_lengths[rank])
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8)

    def _decode(self, step: int, everyone: list[dict], sources: dict) -> torch.Tensor:
        rank, k = self.ctx.rank, self.codec.k
        entries = [(inv["node"], e) for inv in everyone for e in inv["parity"]
                   if e["step"] == step and rank in e["members"]]
        members, length = entries[0][1]["members"], entries[0][1]["length"]
        blocks: dict[int, torch.Tensor] = {}
        for index in range(len(members), k):  # the virtual zero members of a short group
            blocks[index] = torch.zeros(length, dtype=torch.uint8)
        for index, member in enumerate(members):
            kind, node = sources.get(member, (None, None))
            if member != rank and kind == "data":
                block = self._fetch_block(node, member, step)
                blocks[index] = _padded(block, length)
        for node, entry in entries:
            if len(blocks) >= k:
                break
            _, payload = self._peer(node).call("fetch_parity", gid=entry["gid"], j=entry["j"], step=step,
                                               limit=max(self.block_lengths[m] for m in members))
            blocks[k + entry["j"]] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        data = self.codec.decode(dict(sorted(blocks.items())[:k]) if len(blocks) > k else blocks)
        return data[members.index(rank)][: self.layout.nbytes].clone()

    # ---- end -----------------------------------------------------------------------------

    def close(self, release: bool) -> None:
        """Stop the worker; `release` (the run is over) lets the node's keeper exit.

        A failed run (not `release`) waits for the running snapshot's copy only, not for its commit: that
        all-reduce may wait on a dead peer until fault.collective_timeout_s, and a rank that holds its
        process groups that long keeps every rank not next to the dead one waiting too (a failure reaches
        the peers when the failed rank's groups close, `cli._train`). What the snapshot gave its keeper
        stays there for the restore; the abandoned thread ends when its collective fails."""
        try:
            if release:
                self.finish()
            elif self.job is not None:
                self.copied.wait(self.timeout)  # the state's memory may go once the copy is done
                self.job = None
                # The abandoned thread holds this engine: let go of the trainer through it (its state
                # functions reach the model, its DDP/FSDP wrappers and their process groups).
                self.state_fn = self.light_fn = None  # type: ignore[assignment]
                self._cache, self.event = None, _ignore
        finally:
            self.worker.shutdown(wait=release, cancel_futures=not release)
            for client in self.peers.values():
                client.close()
            if self.keeper is not None:
                if release:
                    try:
                        self._call("shutdown")
                    except WireError:
                        pass
                self.keeper.close()
            self._unmap()


def _ignore(*args: Any, **kwargs: Any) -> None:
    pass


def _copy_serial(views: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """CPU copies on this one thread, outside the GIL: `Tensor.copy_` would start an intra-op thread team of
    its own beside the training thread's, and the two teams then fight over the cores every step."""
    for view, source in zip(views, sources):
        source = source.detach()
        if source.is_contiguous() and source.device.type == "cpu" and source.dtype == view.dtype:
            ctypes.memmove(view.data_ptr(), source.data_ptr(), view.numel() * view.element_size())
        else:
            view.copy_(source)


def _padded(block: torch.Tensor, length: int) -> torch.Tensor:
    if block.numel() >= length:
        return block[:length]
    out = torch.zeros(length, dtype=torch.uint8)
    out[: block.numel()] = block
    return out
