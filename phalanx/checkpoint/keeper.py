"""The keeper: one process per node that owns the snapshot memory, so a trainer crash loses nothing.

A keeper holds, for every rank of its node, three snapshot slots in shared-memory files the trainer
maps and fills (the newest complete one, the one filling, and one a persistence write may pin), the
parity blocks of the erasure groups it serves, and a thread that writes committed snapshots to the
persistent tier (`persistent.py`) — the keeper, not the trainer, pays for storage I/O. It listens on
one TCP port of the cluster's interface (loopback for a local run); every connection proves it has
the run's secret (`wire.py`). It exits after `linger_s` without a client, or when told to after the
run's end. Started detached (`python -m phalanx.checkpoint.keeper`), so killing a trainer's process
tree leaves it alive; a keeper that starts finds its node folder empty: a dead keeper's memory died
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
from dataclasses import dataclass, field
from typing import Any, Optional

SLOTS = 3


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
    got: set = field(default_factory=set)

    @property
    def complete(self) -> bool:
        return len(self.got) == len(self.members)


def node_dir(keeper_dir: str, run_id: str, node: int) -> str:
    return os.path.join(keeper_dir, run_id, f"node-{node}")


def discovery_file(keeper_dir: str, run_id: str, node: int) -> str:
    return os.path.join(keeper_dir, run_id, f"node-{node}.json")


class Keeper:
    def __init__(self, run_id: str, node: int, secret: bytes, host: str, keeper_dir: str, linger_s: float):
        self.run_id, self.node, self.secret, self.host = run_id, node, secret, host
        self.keeper_dir, self.linger_s = keeper_dir, linger_s
        self.dir = node_dir(keeper_dir, run_id, node)
        shutil.rmtree(self.dir, ignore_errors=True)  # a previous keeper's memory: gone with it
        os.makedirs(self.dir, exist_ok=True)
        self.lock = threading.Lock()
        self.ranks: dict[int, RankState] = {}
        self.parity: dict[tuple[int, int], list[ParitySlot]] = {}
        self.persist_queue: "queue.Queue[dict]" = queue.Queue()
        self.persist_results: dict[tuple[int, int], dict[str, Any]] = {}  # (rank, step) -> outcome
        self.persisting = 0
        self.clients = 0
        self.last_activity = time.monotonic()
        self.stop_requested = False

    # ---- memory ---------------------------------------------------------------------------

    def register(self, rank: int, nbytes: int, plan: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.stop_requested = False  # a trainer arrived after the last one said goodbye: keep serving
            state = self.ranks.get(rank)
            same = state is not None and state.nbytes == nbytes and \
                state.plan.get("fingerprint") == plan.get("fingerprint")
            if same:
                state.plan = plan  # a restarted trainer of the same run layout re-attaches to its memory
            else:
                if state is not None:
                    for slot in state.slots:
                        slot.buffer.close()
                        os.unlink(slot.path)
                slots = []
                for i in range(SLOTS):
                    path = os.path.join(self.dir, f"rank-{rank}-slot-{i}.bin")
                    with open(path, "w+b") as f:
                        f.truncate(max(nbytes, 1))
                        slots.append(Slot(path, mmap.mmap(f.fileno(), max(nbytes, 1))))
                state = self.ranks[rank] = RankState(nbytes, slots, plan)
            return {"paths": [s.path for s in state.slots]}

    def begin(self, rank: int, step: int) -> dict[str, Any]:
        """A slot for the snapshot of `step`: never the newest complete one, never a pinned one."""
        with self.lock:
            slots = self.ranks[rank].slots
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
            target = self.ranks[rank].slots[slot]
            if target.step != step or target.status != "filling":
                return {"error": f"slot {slot} of rank {rank} holds step {target.step} ({target.status}), not {step}"}
            target.status = "complete"
            return {}

    def _find(self, rank: int, step: int) -> Slot:
        state = self.ranks.get(rank)
        for slot in state.slots if state else ():
            if slot.step == step and slot.status == "complete":
                return slot
        raise KeyError(f"rank {rank} step {step} is not held by the keeper of node {self.node}")

    def parity_add(self, gid: int, j: int, step: int, index: int, members: list[int], length: int,
                   fingerprint: str, epoch: str, payload: memoryview) -> dict[str, Any]:
        import torch

        with self.lock:
            slots = self.parity.setdefault((gid, j), [])
            target = next((s for s in slots if s.step == step and s.epoch == epoch), None)
            if target is None:
                # Steps at or after this one belong to a timeline that was rolled back (a restore from
                # an older step): stale. Of the rest, only the newest complete parity is kept.
                complete = [s for s in slots if s.step < step and s.complete]
                slots[:] = [max(complete, key=lambda s: s.step)] if complete else []
                target = ParitySlot(step, bytearray(length), list(members), fingerprint, epoch)
                slots.append(target)
            if index in target.got:
                return {"error": f"parity {j} of group {gid} step {step} already holds member {index}"}
            target.got.add(index)
            if len(payload):
                dst = torch.frombuffer(target.buffer, dtype=torch.uint8, count=len(payload))
                dst.bitwise_xor_(torch.frombuffer(payload, dtype=torch.uint8))
            return {"complete": target.complete}

    def inventory(self) -> dict[str, Any]:
        with self.lock:
            data = {str(rank): {"fp": state.plan.get("fingerprint"),
                                "steps": [[s.step, i] for i, s in enumerate(state.slots) if s.status == "complete"]}
                    for rank, state in self.ranks.items()}
            parity = [{"gid": gid, "j": j, "step": s.step, "members": s.members, "length": len(s.buffer),
                       "fp": s.fingerprint}
                      for (gid, j), slots in self.parity.items() for s in slots if s.complete]
            return {"node": self.node, "data": data, "parity": parity}

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
        from phalanx.checkpoint.persistent import CheckpointStore

        while True:
            request, slot, nbytes, plan = self.persist_queue.get()
            rank, step = request["rank"], request["step"]
            outcome: dict[str, Any] = {"done": True}
            store = CheckpointStore(request["storage"])
            try:
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
        from phalanx.checkpoint.wire import WireError, handshake_server, recv, send

        try:  # `clients` was counted by the accept loop, before this thread existed
            conn.settimeout(30)
            handshake_server(conn, self.secret)
            conn.settimeout(None)  # trainers hold their connection for the whole run
            while True:
                header, payload = recv(conn)
                self.last_activity = time.monotonic()
                reply, data = self.dispatch(header, payload)
                send(conn, reply, data)
                if header["op"] == "shutdown":
                    return
        except (WireError, OSError, ConnectionError):
            pass  # a client went away (or was refused): its memory stays
        finally:
            conn.close()
            with self.lock:
                self.clients -= 1
                self.last_activity = time.monotonic()

    def dispatch(self, header: dict[str, Any], payload: Optional[memoryview]) -> tuple[dict, Optional[memoryview]]:
        op = header["op"]
        try:
            if op == "hello":
                return {"node": self.node, "pid": os.getpid(), "run_id": self.run_id}, None
            if op == "register":
                return self.register(header["rank"], header["nbytes"], header.get("plan", {})), None
            if op == "begin":
                return self.begin(header["rank"], header["step"]), None
            if op == "complete":
                return self.complete(header["rank"], header["slot"], header["step"]), None
            if op == "inventory":
                return self.inventory(), None
            if op == "fetch":
                with self.lock:
                    slot, nbytes = self._find(header["rank"], header["step"]), self.ranks[header["rank"]].nbytes
                return {"nbytes": nbytes}, memoryview(slot.buffer)[:nbytes]
            if op == "parity_add":
                return self.parity_add(header["gid"], header["j"], header["step"], header["index"],
                                       header["members"], header["length"], header["fp"], header["epoch"],
                                       payload), None
            if op == "fetch_parity":
                with self.lock:
                    slots = self.parity.get((header["gid"], header["j"]), [])
                    match = next((s for s in slots if s.step == header["step"] and s.complete), None)
                if match is None:
                    return {"error": f"no complete parity {header['j']} of group {header['gid']} for step "
                                     f"{header['step']} on node {self.node}"}, None
                return {}, memoryview(match.buffer)
            if op == "persist":
                return self.persist(header), None
            if op == "persist_busy":  # a write of this rank still holds a slot: the next persist waits
                with self.lock:
                    state = self.ranks.get(header["rank"])
                    return {"busy": bool(state and any(s.pinned for s in state.slots))}, None
            if op == "persist_status":
                with self.lock:
                    return dict(self.persist_results.get((header["rank"], header["step"]), {"done": False,
                                                                                           "unknown": True})), None
            if op == "shutdown":
                self.stop_requested = True
                return {}, None
            return {"error": f"unknown keeper operation '{op}'"}, None
        except KeyError as err:
            return {"error": str(err.args[0]) if err.args else repr(err)}, None

    def serve(self) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((self.host, 0))
        server.listen(64)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        info = {"host": self.host, "port": port, "pid": os.getpid(), "node": self.node, "run_id": self.run_id}
        path = discovery_file(self.keeper_dir, self.run_id, self.node)
        with open(path + ".tmp", "w") as f:
            json.dump(info, f)
        os.replace(path + ".tmp", path)
        threading.Thread(target=self._persist_worker, daemon=True).start()
        # torch (for parity and persistence) loads while the run warms up, not on its first checkpoint
        threading.Thread(target=__import__, args=("torch",), daemon=True).start()
        try:
            while True:
                try:
                    conn, _ = server.accept()
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    with self.lock:  # counted here, so the idle check below never misses a new client
                        self.clients += 1
                    threading.Thread(target=self.handle, args=(conn,), daemon=True).start()
                except socket.timeout:
                    pass
                with self.lock:
                    idle = self.clients == 0 and self.persisting == 0
                    quiet = time.monotonic() - self.last_activity
                if idle and (self.stop_requested or quiet > self.linger_s):
                    return
        finally:
            server.close()
            try:
                with open(path) as f:
                    if json.load(f).get("pid") == os.getpid():
                        os.unlink(path)
            except (OSError, ValueError):
                pass
            shutil.rmtree(self.dir, ignore_errors=True)


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
