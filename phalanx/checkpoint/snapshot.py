"""The snapshot engine: every step's whole Trainer state into keeper memory, off the training path.

After optimizer step S the state is immutable until step S+1's optimizer step (DataStates-LLM), so
`snapshot(S)` only takes a keeper slot and the state's sources, and hands the copy to a background
worker (on CUDA a side stream into page-locked memory); `wait_copied()` before the next optimizer
step is the only place training can wait. The worker then commits S: the block is marked complete in
the keeper, parity goes to the keepers of the erasure group, and every rank agrees on the checkpoint's
own gloo group that S is complete everywhere. A committed step is persisted by the keepers while training
goes on, and by the trainers themselves when the run waits for it (`persist_client.py`).

`SnapshotEngine` is the trainer's handle and only sequences its parts, one concern each:
`KeeperSlots` (attach, slots, pinning), `PeerKeepers` (other nodes' keepers), `SnapshotSources` and
`SlotCopier` (what is copied and how), `SnapshotCommit` (complete, parity, commit), `PersistClient`
(asking keepers to persist) and `Restorer` (restore along `restore_plan.plan_restore`).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.distributed as dist

from phalanx.checkpoint.collectives import CheckpointCollectives, node_ids
from phalanx.checkpoint.commit import SnapshotCommit
from phalanx.checkpoint.copies import SlotCopier, SnapshotSources, StateFn
from phalanx.checkpoint.erasure import ErasureCodec
from phalanx.checkpoint.groups import erasure_groups
from phalanx.checkpoint.keeper import persists_while_training
from phalanx.checkpoint.link import run_identity
from phalanx.checkpoint.measure import Measurement, measure
from phalanx.checkpoint.peers import PeerKeepers
from phalanx.checkpoint.persist_client import PersistClient
from phalanx.checkpoint.persistent import CheckpointStore
from phalanx.checkpoint.restore import Restorer
from phalanx.checkpoint.signing import signing_key
from phalanx.checkpoint.slots import KeeperSlots
from phalanx.checkpoint.wire import WireError
from phalanx.errors import PhalanxError
from phalanx.parallel.layout import Layout

if TYPE_CHECKING:
    from phalanx.parallel.dist import DistContext

class SnapshotEngine:
    """One per rank. Collective methods (setup, restore, persist_and_wait, close) are called by every rank together."""

    def __init__(self, cfg: Any, ctx: DistContext, run_dir: str, state_fn: StateFn,
                 rank_local_keys: tuple[str, ...], event: Callable[..., None], light_fn: Optional[StateFn] = None,
                 group: Optional[Any] = None):
        self.cfg, self.ctx, self.run_dir, self.state_fn = cfg.checkpoint, ctx, run_dir, state_fn
        self.rank_local_keys, self.event = rank_local_keys, event
        self.timeout = cfg.fault.collective_timeout_s
        # the checkpoint's own gloo group: commits and plans never queue behind training
        self.collectives = CheckpointCollectives(group, ctx.world_size)
        identity = (*run_identity(run_dir, self.cfg.key_file), os.urandom(8).hex()) if ctx.is_main else None
        self.run_id, self.secret, self.epoch = self.collectives.broadcast(identity)  # epoch: this launch
        self.nodes = node_ids(ctx, self.cfg.simulate_nodes, group)
        self.node = self.nodes[ctx.rank]
        self.store = CheckpointStore(self.cfg.storage or os.path.join(run_dir, "checkpoints"),
                                     key=signing_key(self.secret) if self.cfg.sign else None, run_hint=run_dir)
        groups, why_no_parity = erasure_groups(self.nodes, self.cfg.erasure_k, self.cfg.erasure_m)
        if not groups and ctx.is_main:  # said once: a run on several nodes expects to survive losing one
            event("erasure_off", reason=why_no_parity)
            if len(set(self.nodes)) > 1 and self.cfg.erasure_m > 0:
                print(f"phalanx: {why_no_parity}", flush=True)
        codec = ErasureCodec(self.cfg.erasure_k, self.cfg.erasure_m) if groups else None
        my_group, my_index = next(((g, g.members.index(ctx.rank)) for g in groups if ctx.rank in g.members),
                                  (None, -1))
        self.measured: Optional[Measurement] = None
        self.slots = KeeperSlots(cfg=self.cfg, run_dir=run_dir, run_id=self.run_id, secret=self.secret,
                                 node=self.node, rank=ctx.rank, device=ctx.device, timeout=self.timeout,
                                 event=self._emit,
                                 warm=persists_while_training(cfg))
        self.peers = PeerKeepers(self.slots, self.secret, self.timeout)
        self.sources = SnapshotSources(state_fn, light_fn)
        self.copier = SlotCopier(ctx.device)
        self.commit = SnapshotCommit(slots=self.slots, peers=self.peers, collectives=self.collectives, codec=codec,
                                     group=my_group, index=my_index, rank=ctx.rank, epoch=self.epoch,
                                     event=self._emit)
        # recorded in each manifest and keeper registration: a resume says what it resharded from
        self.layout_name = layout = Layout.from_config(cfg).name()
        self.persist = PersistClient(slots=self.slots, store=self.store, collectives=self.collectives, cfg=self.cfg,
                                     rank=ctx.rank, world_size=ctx.world_size, timeout=self.timeout, layout=layout)
        self.restorer = Restorer(slots=self.slots, peers=self.peers, collectives=self.collectives, store=self.store,
                                 codec=codec, nodes=self.nodes, rank=ctx.rank, rank_local_keys=rank_local_keys,
                                 run_dir=run_dir, event=self._emit, layout=layout)
        self._started = False  # keepers started and addresses exchanged (at the first snapshot)
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="phalanx-snapshot")
        self.job: Optional[concurrent.futures.Future] = None
        self.committed_slot = -1  # the keeper slot of the newest committed step
        self.copied = threading.Event()
        self.copied.set()
        self.stall_s = 0.0  # main-thread seconds spent in snapshot() and wait_copied()

    def _emit(self, kind: str, **fields: Any) -> None:
        self.event(kind, **fields)  # looked up per call: a failed run's close() silences the parts at once

    # ---- setup ---------------------------------------------------------------------------

    def setup(self, measure: bool = True) -> None:
        """Measure the state layout, attach to the keeper, agree on the persistence plan (collective).
        `measure=False` defers the state measurement to the first snapshot or memory restore (a back end
        whose state_dict() must not be taken before training starts)."""
        # A keeper left by an earlier launch holds its memory: attach now, for restore. Otherwise
        # the keeper starts with the first snapshot (a trainer that never snapshots never starts one).
        self.slots.find()
        if measure:
            self._ensure_measured()
        self.peers.gather_addresses(self.collectives)

    def _ensure_measured(self) -> None:
        """The layout is known and this rank registered with its keeper, if any (collective)."""
        if self.measured is not None:
            return
        self._measure(self.state_fn())
        if self.slots.keeper is not None:
            self.slots.attach(self.measured)

    def _measure(self, state: dict[str, Any]) -> None:
        self.measured = measure(state, self.rank_local_keys, self.ctx.rank, self.ctx.world_size,
                                self.cfg.erasure_k, self.cfg.erasure_m, self.collectives.all_gather)
        self.measured.plan.update(world_size=self.ctx.world_size, parallel=self.layout_name)  # for a reshard
        self.sources.reset(self.measured.layout, state)

    def _ensure_keepers(self) -> None:
        """Before the first snapshot (every rank at once): a keeper on every node, and their addresses."""
        if self._started:
            return
        if self.slots.keeper is None:
            self.slots.attach(self.measured)
        self.peers.gather_addresses(self.collectives)
        self._started = True

    def _relayout_if_grown(self) -> Optional[dict[str, Any]]:
        """Without cached sources, the state of this snapshot — measured again, on every rank at once,
        when any rank's grew (DeepSpeed creates its optimizer moments at the first step)."""
        if self.sources.cache is not None:
            return None
        state = self.state_fn()
        grown = torch.tensor([0 if self.measured.layout.matches(state) else 1])
        self.collectives.all_reduce(grown, dist.ReduceOp.MAX)  # the worker is idle here (finish() ran)
        if int(grown):
            self._measure(state)
            if self.slots.keeper is not None:
                self.slots.attach(self.measured)  # the keeper makes slots of the new size
        return state

    def state_replaced(self) -> None:
        """After a load: optimizers load into new tensors, so the cached sources are found again."""
        self.sources.state_replaced()

    # ---- snapshots -----------------------------------------------------------------------

    def snapshot(self, step: int, persist: bool = False) -> None:
        """Start the snapshot of the state after step `step`; returns once the copy is handed to the worker."""
        start = time.perf_counter()
        self.finish()
        self._ensure_measured()
        self._ensure_keepers()
        state = self._relayout_if_grown()
        try:
            slot = self.slots.begin(step)
        except WireError as err:  # the keeper died: start another one; this step's snapshot is lost
            self.slots.reattach(step, err)
            return
        (sources, write_skeleton), views = self.sources.take(self.slots.blocks[slot], state), self.slots.views(slot)
        self.copied.clear()
        ready = self.copier.ready_point()  # on a GPU: the copies start after this step's update
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
        return self.commit.committed

    def _complete(self, step: int, slot: int, sources: list[torch.Tensor], views: list[torch.Tensor],
                  ready: Optional[Any], persist: bool, write_skeleton: Optional[Callable[[], None]]) -> None:
        # The copy first, and nothing else that needs the GIL until it is done: this thread starts as the
        # training thread launches the next step, which must not wait for the GIL then.
        try:
            self.copier.copy(views, sources, ready)
        finally:
            self.copied.set()
        if write_skeleton is not None:  # from values captured by snapshot(): the state may move on now
            write_skeleton()
        ok = self.commit.publish(step, slot, self.measured)
        # One all-reduce commits the step (complete on every rank) and, for a persist step, asks whether
        # any keeper is still writing the last one: then this step is not persisted (a lazy tier backs off).
        committed, busy = self.commit.agree(step, ok, persist and ok and self.persist.busy())
        if not committed:
            return
        self.committed_slot = slot
        if persist and not busy:
            self.persist.request(step)
        elif persist and self.ctx.is_main:
            self.event("persist_skipped", step=step, reason="the previous persistent checkpoint is still being written")
        if self.cfg.snapshot_every:  # the next snapshot's slot, reserved off the training thread
            self.slots.reserve(step + self.cfg.snapshot_every)

    # ---- persistence and restore ---------------------------------------------------------

    def persist_and_wait(self, step: int) -> Optional[str]:
        """Snapshot `step` if needed, persist it from its keeper slot and wait until it is written; returns
        the checkpoint path on rank 0. Collective."""
        if self.finish() != step:
            self.snapshot(step)
            if self.finish() != step:
                raise PhalanxError(f"the snapshot of step {step} did not commit ({self.commit.last_error}); "
                                   f"see events.jsonl")
        return self.persist.persist_and_wait(step, self.slots.memory(self.committed_slot), self.measured.plan)

    def restore(self, template_fn: StateFn) -> tuple[Optional[dict[str, Any]], Optional[int], dict[str, Any]]:
        """(state, step, info): the newest usable state, from memory if any, else storage (`restore_plan`).
        A stored step any rank refuses is reported and the plan made again without it. Collective."""
        if self.measured is None and any(self.collectives.all_gather(self.slots.keeper is not None)):
            self._ensure_measured()  # some keeper may hold this run's memory: its blocks need the layout
        return self.restorer.restore(template_fn, self.measured)

    # ---- end -----------------------------------------------------------------------------

    def close(self, release: bool) -> None:
        """Stop the worker; `release` (the run is over) lets the node's keeper exit.

        A failed run (not `release`) waits for the running snapshot's copy only, not for its commit: that
        all-reduce may wait on a dead peer until fault.collective_timeout_s, and a rank that holds its
        process groups that long keeps every rank not next to the dead one waiting too (a failure reaches
        the peers when the failed rank's groups close). What the snapshot gave its keeper stays there for
        the restore; the abandoned thread ends when its collective fails."""
        try:
            if release:
                self.finish()
            elif self.job is not None:
                self.copied.wait(self.timeout)  # the state's memory may go once the copy is done
                self.job = None
                # The abandoned thread holds this engine: let go of the trainer through it (its state
                # functions reach the model, its DDP/FSDP wrappers and their process groups).
                self.state_fn = None  # type: ignore[assignment]
                self.sources.release()
                self.event = _ignore
        finally:
            self.worker.shutdown(wait=release, cancel_futures=not release)
            self.peers.close()
            self.slots.close(release)


def _ignore(*args: Any, **kwargs: Any) -> None:
    pass
