"""The keeper: one process per node that owns the snapshot memory, so a trainer crash loses nothing.

A keeper holds, for every rank of its node, three snapshot slots in shared-memory files the trainer
maps and fills (the newest complete one, the one filling, and one a persistence write may pin), the
parity blocks of the erasure groups it serves, and a thread that writes committed snapshots to the
persistent tier (`persistent.py`) while the run trains — the keeper, not the trainer, pays for that
storage I/O (a step the run stops to wait for, its trainers write themselves). It never loads torch: it
writes torch's formats itself (`torchfmt.py`), and loads the persistent tier early only for a run that persists
while it trains (`persists_while_training`, `register`'s `warm`). A rank registered
again by a launch of another layout keeps its earlier memory aside (`held.py`) until the new layout
commits a step, so that launch can reshard it (`reshard.py`). It listens on
one TCP port of the cluster's interface (loopback for a local run); every connection proves it has
the run's secret (`wire.py`), checked for all new connections at once in the serving thread
(`gate.py`): at most `max_pending` in the handshake, none longer than `handshake_timeout_s`, and only
an authenticated connection gets a thread. A request payload may be at most `frame_limit` bytes, the
largest block a trainer registered (1 MiB before any), and a request's fields are checked against the
`OPS` table before its handler runs. It exits after `linger_s` without an authenticated client, or
when told to after the run's end. Started detached (`python -m phalanx.checkpoint.keeper`), so killing
a trainer's process tree leaves it alive; a keeper that starts finds its node folder empty: a dead keeper's memory died
with it, as on a real machine.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import queue
import shutil
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

from phalanx.checkpoint.gate import HandshakeGate
from phalanx.checkpoint.held import HeldParity, RankState, Slot, held_steps
from phalanx.checkpoint.wire import SMALL_PAYLOAD_BYTES, Field, WireError, field_problem, recv, send
from phalanx.errors import PhalanxError

SLOTS = 3
MAX_RANKS = 1 << 20
MAX_BLOCK_BYTES = 1 << 48


def persists_while_training(cfg: Any) -> bool:
    """Whether a run asks its keepers for a persistent write before its last step (the last one its
    trainers write): then its keepers load the persistent tier as they start."""
    return 0 < cfg.checkpoint.persist_every < cfg.train.steps


def node_dir(keeper_dir: str, run_id: str, node: int) -> str:
    return os.path.join(keeper_dir, run_id, f"node-{node}")


def discovery_file(keeper_dir: str, run_id: str, node: int) -> str:
    return os.path.join(keeper_dir, run_id, f"node-{node}.json")


def _private_dir(path: str) -> None:
    """`path` exists and only its owner can enter it: it holds a run's snapshots and keeper addresses."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    try:
        os.chmod(path, 0o700)  # made earlier, with the umask's mode (link.connect_keeper)
    except PermissionError:
        raise PhalanxError(f"keeper folder {path} belongs to another user; remove it or set "
                           f"checkpoint.keeper_dir to a folder of your own") from None


class Keeper:
    """A node's snapshot memory and the server that hands it out (module docstring)."""

    def __init__(self, run_id: str, node: int, secret: bytes, host: str, keeper_dir: str, linger_s: float,
                 *, max_pending: int = 64, handshake_timeout_s: float = 5.0):
        self.run_id, self.node, self.secret, self.host = run_id, node, secret, host
        self.keeper_dir, self.linger_s = keeper_dir, linger_s
        self.max_pending, self.handshake_timeout_s = max_pending, handshake_timeout_s
        self.dir = node_dir(keeper_dir, run_id, node)
        shutil.rmtree(self.dir, ignore_errors=True)  # a previous keeper's memory: gone with it
        _private_dir(os.path.join(keeper_dir, run_id))
        _private_dir(self.dir)
        self.frame_limit = SMALL_PAYLOAD_BYTES  # grows to the largest block a trainer registers
        self.lock = threading.Lock()
        self.ranks: dict[int, RankState] = {}
        # (rank, fingerprint) -> the memory of an earlier layout's rank, kept when a launch of another layout
        # registers that rank: the new launch reshards it (`reshard.py`); dropped at the new layout's first commit
        self.retired: dict[tuple[int, str], RankState] = {}
        self.parity = HeldParity()
        self.persist_queue: "queue.Queue[dict]" = queue.Queue()
        self.persist_results: dict[tuple[int, int], dict[str, Any]] = {}  # (rank, step) -> outcome
        self.persisting = 0
        self.clients = 0
        self.last_activity = time.monotonic()
        self.stop_requested = False
        self.warming = False  # the persistent tier loads in the background, once

    # ---- memory ---------------------------------------------------------------------------

    def register(self, rank: int, nbytes: int, plan: dict[str, Any], max_block: int = 0,
                 warm: bool = False) -> dict[str, Any]:
        """Slots for `rank`; `max_block`, the largest block of any rank, bounds the parity it may receive.
        `warm`: the run persists while it trains, so the persistent tier (fsspec) loads now, while it warms up,
        not on its first persist."""
        if warm:
            self.warm_up()
        with self.lock:
            self.stop_requested = False  # a trainer arrived after the last one said goodbye: keep serving
            self.frame_limit = max(self.frame_limit, nbytes, max_block)
            state = self.ranks.get(rank)
            same = state is not None and state.nbytes == nbytes and \
                state.plan.get("fingerprint") == plan.get("fingerprint")
            if same:
                state.plan = plan  # a restarted trainer of the same run layout re-attaches to its memory
            else:
                if state is not None and any(slot.status == "complete" for slot in state.slots):
                    fingerprint = state.plan.get("fingerprint", "")
                    self._close(self.retired.pop((rank, fingerprint), None))
                    for slot in state.slots:  # out of the way of the new layout's files
                        retired = slot.path.replace(".bin", f"-retired-{fingerprint}.bin")
                        os.rename(slot.path, retired)
                        slot.path = retired
                    self.retired[(rank, fingerprint)] = state
                else:
                    self._close(state)
                slots = []
                for i in range(SLOTS):
                    path = os.path.join(self.dir, f"rank-{rank}-slot-{i}.bin")
                    with open(path, "w+b") as f:
                        f.truncate(max(nbytes, 1))
                        slots.append(Slot(path, mmap.mmap(f.fileno(), max(nbytes, 1))))
                state = self.ranks[rank] = RankState(nbytes, slots, plan)
            return {"paths": [s.path for s in state.slots]}

    def warm_up(self) -> None:
        """Load the persistent tier (fsspec; never torch: `torchfmt.py` writes its formats) in the background."""
        with self.lock:
            if self.warming:
                return
            self.warming = True
        threading.Thread(target=__import__, args=("phalanx.checkpoint.persistent",), daemon=True).start()

    def begin(self, rank: int, step: int) -> dict[str, Any]:
        """A slot for the snapshot of `step`: never the newest complete one, never a pinned one."""
        with self.lock:
            slots = self._state(rank).slots
            for slot in slots:  # a snapshot of `step` means the run is at `step`: later ones are stale
                if slot.step is not None and slot.step >= step:
                    slot.status, slot.step = "empty", None
            newest = self._newest(slots)
            free = [i for i, s in enumerate(slots) if i != newest and not s.pinned]
            free.sort(key=lambda i: (slots[i].status == "complete", slots[i].step or -1))
            if not free:  # cannot happen while persists are skipped when busy; refused, not crashed
                return {"error": f"no free snapshot slot for rank {rank}: the newest is kept and the others "
                                 f"are being persisted"}
            index = free[0]
            slots[index].step, slots[index].status = step, "filling"
            return {"slot": index}

    @staticmethod
    def _newest(slots: list[Slot]) -> Optional[int]:
        complete = [(s.step, i) for i, s in enumerate(slots) if s.status == "complete"]
        return max(complete)[1] if complete else None

    def complete(self, rank: int, slot: int, step: int) -> dict[str, Any]:
        with self.lock:
            target = self._state(rank).slots[slot]
            if target.step != step or target.status != "filling":
                return {"error": f"slot {slot} of rank {rank} holds step {target.step} ({target.status}), not {step}"}
            target.status = "complete"
            self._drop_other_layouts(self.ranks[rank].plan.get("fingerprint", ""))
            return {}

    def _drop_other_layouts(self, fingerprint: str) -> None:
        """A step of the layout `fingerprint` is complete: earlier layouts' memory is no longer needed."""
        for key in list(self.retired):
            self._close(self.retired.pop(key))
        for rank in [r for r, state in self.ranks.items() if state.plan.get("fingerprint", "") != fingerprint]:
            self._close(self.ranks.pop(rank))
        self.parity.keep_only(fingerprint)

    @staticmethod
    def _close(state: Optional[RankState]) -> None:
        for slot in state.slots if state is not None else ():
            try:
                slot.buffer.close()
            except BufferError:  # a reply's view of it (a `fetch`) is still alive: unmapped when it goes
                pass
            os.unlink(slot.path)

    def _state(self, rank: int) -> RankState:
        if rank not in self.ranks:
            raise KeyError(f"rank {rank} is not registered with the keeper of node {self.node}")
        return self.ranks[rank]

    def _held(self, rank: int, fingerprint: Optional[str] = None) -> Optional[RankState]:
        """Rank `rank`'s memory: the registered one, or with `fingerprint`, that layout's (retired or not)."""
        state = self.ranks.get(rank)
        if fingerprint is None or (state is not None and state.plan.get("fingerprint", "") == fingerprint):
            return state
        return self.retired.get((rank, fingerprint))

    def _find(self, rank: int, step: int, fingerprint: Optional[str] = None) -> Slot:
        state = self._held(rank, fingerprint)
        for slot in state.slots if state else ():
            if slot.step == step and slot.status == "complete":
                return slot
        raise KeyError(f"rank {rank} step {step} is not held by the keeper of node {self.node}")

    def parity_add(self, gid: int, j: int, step: int, index: int, members: list[int], length: int,
                   fingerprint: str, epoch: str, payload: Optional[memoryview], k: int = 0, m: int = 0
                   ) -> dict[str, Any]:
        payload = payload if payload is not None else memoryview(b"")
        if index >= len(members):
            raise IndexError(f"member index {index} is outside the group's {len(members)} members")
        if length > self.frame_limit:
            raise ValueError(f"parity length {length} exceeds this keeper's frame limit of {self.frame_limit} bytes "
                             f"(the largest block registered)")
        if len(payload) > length:
            raise ValueError(f"parity payload of {len(payload)} bytes is longer than its length {length}")
        with self.lock:
            return self.parity.add(gid, j, step, index, members, length, fingerprint, epoch, payload, k, m)

    def member_layout(self, rank: int, fingerprint: str, layout: dict[str, Any], nbytes: int) -> dict[str, Any]:
        """The flat layout of a member of a group whose parity this keeper holds (`layout` serves it)."""
        if nbytes > self.frame_limit:
            raise ValueError(f"member block of {nbytes} bytes exceeds this keeper's frame limit of "
                             f"{self.frame_limit} bytes")
        with self.lock:
            if not self.parity.member_layout(rank, fingerprint, layout, nbytes):
                return {"error": f"the keeper of node {self.node} holds no parity of rank {rank}, layout {fingerprint}"}
            return {}

    def inventory(self) -> dict[str, Any]:
        with self.lock:
            data = {str(rank): held_steps(state) for rank, state in self.ranks.items()}
            retired = [{"rank": rank, **held_steps(state)} for (rank, _), state in self.retired.items()]
            return {"node": self.node, "data": data, "parity": self.parity.inventory(), "retired": retired}

    def fetch(self, rank: int, step: int, fingerprint: Optional[str] = None) -> tuple[dict[str, Any], memoryview]:
        with self.lock:
            slot, nbytes = self._find(rank, step, fingerprint), self._held(rank, fingerprint).nbytes
        return {"nbytes": nbytes}, memoryview(slot.buffer)[:nbytes]

    def layout(self, rank: int, fingerprint: str) -> dict[str, Any]:
        """The flat layout of rank `rank`'s blocks of layout `fingerprint` (`flat.FlatLayout.to_json`): of a rank
        it holds, or of a member of a group whose parity it holds."""
        with self.lock:
            state = self._held(rank, fingerprint)
            if state is not None:
                return {"layout": state.plan.get("layout"), "nbytes": state.nbytes}
            if (fingerprint, rank) in self.parity.layouts:
                return dict(self.parity.layouts[(fingerprint, rank)])
            return {"error": f"rank {rank} of layout {fingerprint} is not held by the keeper of node {self.node}"}

    def fetch_parity(self, gid: int, j: int, step: int) -> tuple[dict[str, Any], Optional[memoryview]]:
        with self.lock:
            match = self.parity.complete(gid, j, step)
        if match is None:
            return {"error": f"no complete parity {j} of group {gid} for step {step} on node {self.node}"}, None
        return {}, memoryview(match.buffer)

    # ---- persistence ----------------------------------------------------------------------

    def persist(self, request: dict[str, Any]) -> dict[str, Any]:
        rank, step = request["rank"], request["step"]
        with self.lock:
            if (rank, step) in self.persist_results:
                return {}  # already written or on its way
            slot = self._find(rank, step)
            slot.pinned += 1  # no snapshot reuses it until written
            self.persisting += 1
            self.persist_results[(rank, step)] = {"done": False}
        self.persist_queue.put((request, slot, self.ranks[rank].nbytes, self.ranks[rank].plan))
        return {}

    def _persist_worker(self) -> None:
        """Writes ranks' files one at a time; the coordinator's wait for every rank's files (some of
        which this same keeper may still have to write) runs in a thread of its own."""
        while True:
            request, slot, nbytes, plan = self.persist_queue.get()
            from phalanx.checkpoint.persistent import CheckpointStore  # loaded by `register` when warm
            from phalanx.checkpoint.signing import signing_key

            rank, step = request["rank"], request["step"]
            outcome: dict[str, Any] = {"done": True}
            try:  # a bad storage URL too is reported, not the end of this thread
                key = signing_key(self.secret) if request.get("sign") else None
                store = CheckpointStore(request["storage"], key=key)
                store.write_rank(step, rank, memoryview(slot.buffer)[:nbytes], plan)
            except Exception as err:  # reported to the trainer, which names it in events.jsonl
                outcome["error"] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
            with self.lock:
                slot.pinned -= 1
            if request.get("coordinator") and "error" not in outcome:
                threading.Thread(target=self._finalize, args=(store, request, outcome), daemon=True).start()
            else:
                self._persisted(rank, step, outcome)

    def _finalize(self, store: Any, request: dict[str, Any], outcome: dict[str, Any]) -> None:
        try:
            outcome["path"] = store.finalize(request["step"], request["world_size"], request["timeout_s"],
                                             request["keep_last"], request.get("info", {}), self._in_flight)
        except Exception as err:
            outcome["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        self._persisted(request["rank"], request["step"], outcome)

    def _in_flight(self) -> set[int]:
        """Steps some persist of this keeper has not finished: retention leaves their folders alone."""
        with self.lock:
            return {step for (_, step), outcome in self.persist_results.items() if not outcome.get("done")}

    def _persisted(self, rank: int, step: int, outcome: dict[str, Any]) -> None:
        with self.lock:
            self.persisting -= 1
            self.persist_results[(rank, step)] = outcome

    # ---- serving --------------------------------------------------------------------------

    def handle(self, conn: socket.socket) -> None:
        """Serve one authenticated connection (`gate.py` ran its handshake) until it closes."""
        try:  # `clients` was counted by the serving loop, before this thread existed
            while True:
                header, payload = recv(conn, limit=self.frame_limit)
                self.last_activity = time.monotonic()
                reply, data = self.dispatch(header, payload)
                send(conn, reply, data)
                if header.get("op") == "shutdown":
                    return
        except (WireError, OSError):
            pass  # a client went away, or sent what is not a request (nothing to answer reliably): its memory stays
        finally:
            conn.close()
            with self.lock:
                self.clients -= 1
                self.last_activity = time.monotonic()

    def dispatch(self, header: dict[str, Any], payload: Optional[memoryview]) -> tuple[dict, Optional[memoryview]]:
        """The reply to one request: its `OPS` handler, once every field it needs is there with its type."""
        op = header.get("op")
        if not isinstance(op, str) or op not in OPS:
            return {"error": f"unknown keeper operation {str(op)[:40]!r}; known: {', '.join(OPS)}"}, None
        handler, fields = OPS[op]
        problem = field_problem(op, header, fields)
        if problem is not None:
            return {"error": problem}, None
        try:
            return handler(self, header, payload)
        except (KeyError, ValueError, IndexError) as err:
            return {"error": f"'{op}': {err.args[0] if err.args else type(err).__name__}"}, None

    def persist_busy(self, rank: int) -> dict[str, Any]:
        """Whether a write of `rank` still holds a slot: the next persist waits."""
        with self.lock:
            state = self.ranks.get(rank)
            return {"busy": bool(state and any(s.pinned for s in state.slots))}

    def persist_status(self, rank: int, step: int) -> dict[str, Any]:
        with self.lock:
            return dict(self.persist_results.get((rank, step), {"done": False, "unknown": True}))

    def shutdown(self) -> dict[str, Any]:
        self.stop_requested = True
        return {}

    def serve(self) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((self.host, 0))
        server.listen(128)
        gate = HandshakeGate(server, self.secret, self.max_pending, self.handshake_timeout_s)
        port = server.getsockname()[1]
        info = {"host": self.host, "port": port, "pid": os.getpid(), "node": self.node, "run_id": self.run_id}
        path = discovery_file(self.keeper_dir, self.run_id, self.node)
        with open(path + ".tmp", "w") as f:
            json.dump(info, f)
        os.replace(path + ".tmp", path)
        threading.Thread(target=self._persist_worker, daemon=True).start()
        try:
            while True:
                for conn in gate.poll(0.5):
                    with self.lock:  # counted here, so the idle check below never misses a new client
                        self.clients += 1
                        self.last_activity = time.monotonic()
                    threading.Thread(target=self.handle, args=(conn,), daemon=True).start()
                with self.lock:  # connections still in their handshake do not keep a keeper alive
                    idle = self.clients == 0 and self.persisting == 0
                    quiet = time.monotonic() - self.last_activity
                if idle and (self.stop_requested or quiet > self.linger_s):
                    return
        finally:
            gate.close()
            server.close()
            try:
                with open(path) as f:
                    if json.load(f).get("pid") == os.getpid():
                        os.unlink(path)
            except (OSError, ValueError):
                pass
            shutil.rmtree(self.dir, ignore_errors=True)


RANK = Field("int", upper=MAX_RANKS)
STEP = Field("int")
NBYTES = Field("int", upper=MAX_BLOCK_BYTES)
PARITY = Field("int", upper=256)  # parity and member indices: k + m <= 256 over GF(2^8)

Handler = Callable[[Keeper, dict[str, Any], Optional[memoryview]], tuple[dict[str, Any], Optional[memoryview]]]

# op -> (handler, the fields it reads); other fields of a request are ignored.
OPS: dict[str, tuple[Handler, dict[str, Field]]] = {
    "hello": (lambda k, h, p: ({"node": k.node, "pid": os.getpid(), "run_id": k.run_id}, None), {}),
    "register": (lambda k, h, p: (k.register(h["rank"], h["nbytes"], h.get("plan", {}), h.get("max_block", 0),
                                             h.get("warm", False)), None),
                 {"rank": RANK, "nbytes": NBYTES, "plan": Field("dict", optional=True),
                  "max_block": Field("int", upper=MAX_BLOCK_BYTES, optional=True),
                  "warm": Field("bool", optional=True)}),
    "begin": (lambda k, h, p: (k.begin(h["rank"], h["step"]), None), {"rank": RANK, "step": STEP}),
    "complete": (lambda k, h, p: (k.complete(h["rank"], h["slot"], h["step"]), None),
                 {"rank": RANK, "slot": Field("int", upper=SLOTS), "step": STEP}),
    "inventory": (lambda k, h, p: (k.inventory(), None), {}),
    "fetch": (lambda k, h, p: k.fetch(h["rank"], h["step"], h.get("fp")),
              {"rank": RANK, "step": STEP, "fp": Field("str", optional=True)}),
    "layout": (lambda k, h, p: (k.layout(h["rank"], h["fp"]), None), {"rank": RANK, "fp": Field("str")}),
    "parity_add": (lambda k, h, p: (k.parity_add(h["gid"], h["j"], h["step"], h["index"], h["members"], h["length"],
                                                 h["fp"], h["epoch"], p, h.get("k", 0), h.get("m", 0)), None),
                   {"gid": RANK, "j": PARITY, "step": STEP, "index": PARITY,
                    "members": Field("ints", upper=MAX_RANKS, count=256), "length": NBYTES,
                    "fp": Field("str"), "epoch": Field("str"), "k": Field("int", upper=256, optional=True),
                    "m": Field("int", upper=256, optional=True)}),
    "member_layout": (lambda k, h, p: (k.member_layout(h["rank"], h["fp"], h["layout"], h["nbytes"]), None),
                      {"rank": RANK, "fp": Field("str"), "layout": Field("dict"), "nbytes": NBYTES}),
    "fetch_parity": (lambda k, h, p: k.fetch_parity(h["gid"], h["j"], h["step"]),
                     {"gid": RANK, "j": PARITY, "step": STEP}),
    "persist": (lambda k, h, p: (k.persist(h), None),
                {"rank": RANK, "step": STEP, "storage": Field("str"), "world_size": Field("int", upper=MAX_RANKS + 1),
                 "coordinator": Field("bool", optional=True), "timeout_s": Field("number"), "keep_last": Field("int"),
                 "info": Field("dict", optional=True), "sign": Field("bool", optional=True)}),
    "persist_busy": (lambda k, h, p: (k.persist_busy(h["rank"]), None), {"rank": RANK}),
    "persist_status": (lambda k, h, p: (k.persist_status(h["rank"], h["step"]), None), {"rank": RANK, "step": STEP}),
    "shutdown": (lambda k, h, p: (k.shutdown(), None), {}),
}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phalanx.checkpoint.keeper")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--node", type=int, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--linger", type=float, default=600.0)
    parser.add_argument("--log", default=None)
    parser.add_argument("--run-dir", default=None, help="informational: the run this keeper serves")
    parser.add_argument("--daemon", action="store_true", help="detach: the caller's process tree does not hold it")
    args = parser.parse_args(argv)
    secret = bytes.fromhex(sys.stdin.readline().strip())  # never on the command line (visible in ps)
    if args.daemon:
        if os.fork() > 0:
            os._exit(0)
        os.setsid()
    if args.log:
        log = open(args.log, "a", buffering=1)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    Keeper(args.run_id, args.node, secret, args.host, args.dir, args.linger).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
