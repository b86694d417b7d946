"""Run a function on N local gloo ranks on loopback: the planner's measurements and calibration, and the
parity tests. The ranks are spawned once and reused, so torch and phalanx are imported once per pool
rather than once per rank and call (most of a short measurement's time on a small machine)."""

from __future__ import annotations

import gc
import importlib
import io
import multiprocessing as mp
import os
import socket
import sys
import time
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable, Optional

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forget_deepspeed_groups() -> None:
    """DeepSpeed keeps process groups in module globals; the next call in this process starts without them."""
    if "deepspeed.utils.groups" in sys.modules:
        importlib.reload(sys.modules["deepspeed.utils.groups"])
        sys.modules["deepspeed.comm.comm"].cdb = None


def _serve(conn: Any) -> None:
    """One pooled rank: run calls until the pipe closes; each call has its own port and process group."""
    import torch.distributed as dist

    from phalanx.telemetry import comm

    while True:
        try:
            fn, args, rank, world, port, threads = conn.recv()
        except EOFError:
            return
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        torch.set_num_threads(threads)
        comm.STATS.take()  # counters start at zero for every call
        try:
            result = fn(*args)
            buf = io.BytesIO()
            if rank == 0:
                torch.save(result, buf)
            reply = (True, buf.getvalue())
        except BaseException:  # noqa: BLE001 - reported by the caller
            reply = (False, traceback.format_exc())
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            _forget_deepspeed_groups()
            gc.collect()
        conn.send(reply)


class LocalRanks:
    """`size` spawned processes; `run(fn, world, *args)` runs `fn(*args)` on the first `world` of them with
    RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a fresh MASTER_PORT set, and returns rank 0's value. `fn`
    creates and may destroy its process group; one left open is destroyed after the call. A call that fails
    or outlives `timeout_s` closes the pool (its other ranks may wait in a collective with the failed one)."""

    def __init__(self, size: int, timeout_s: float = 600.0) -> None:
        self.size, self.timeout_s = size, timeout_s
        context = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(size):
            parent, child = context.Pipe()
            proc = context.Process(target=_serve, args=(child,), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(proc.is_alive() for proc in self.procs)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.join(timeout=10)
        self.procs = []

    def run(self, fn: Callable[..., Any], world: int, *args: Any, threads: int = 1) -> Any:
        if not 1 <= world <= self.size:
            raise ValueError(f"world={world}: this pool runs 1 to {self.size} ranks")
        try:
            return self._run(fn, world, args, threads)
        except BaseException:
            self.close()
            raise

    def _run(self, fn: Callable[..., Any], world: int, args: tuple, threads: int) -> Any:
        port = free_port()
        for rank in range(world):
            self.conns[rank].send((fn, args, rank, world, port, threads))
        pending, replies = {self.conns[r]: r for r in range(world)}, {}
        deadline = time.monotonic() + self.timeout_s
        while pending:
            ready = wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"ranks {sorted(pending.values())} did not finish within {self.timeout_s:.0f}s")
            for conn in ready:
                rank = pending.pop(conn)
                try:
                    ok, payload = conn.recv()
                except EOFError:
                    raise RuntimeError(f"local rank {rank} died") from None
                if not ok:
                    raise RuntimeError(f"local rank {rank} failed:\n{payload}")
                replies[rank] = payload
        return torch.load(io.BytesIO(replies[0]), weights_only=False)


_SHARED: Optional[LocalRanks] = None


def run_local(fn: Callable[..., Any], world: int, *args: Any, threads: int = 1, pool_size: int = 0) -> Any:
    """`fn(*args)` on `world` local ranks of this process's shared pool (started on first use with
    max(world, pool_size) ranks, restarted larger when a call needs more, and after a failed call);
    rank 0's return value."""
    global _SHARED
    if _SHARED is None or not _SHARED.alive or _SHARED.size < world:
        if _SHARED is not None:
            _SHARED.close()
        _SHARED = LocalRanks(size=max(world, pool_size))
    return _SHARED.run(fn, world, *args, threads=threads)
