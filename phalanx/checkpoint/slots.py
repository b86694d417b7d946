"""This rank's keeper and the slots it maps: attach (find or start the node's keeper), register the
block size, map the slots the keeper hands out as shared memory, page-lock them for GPU copies, and
take a slot per snapshot (reserved one snapshot ahead, off the training thread)."""

from __future__ import annotations

import mmap
import threading
import warnings
from typing import Any, Callable, Optional

import torch

from phalanx.checkpoint.link import connect_keeper, default_keeper_dir, find_keeper, keeper_host
from phalanx.checkpoint.measure import Measurement
from phalanx.checkpoint.wire import KeeperClient, WireError
from phalanx.errors import PhalanxError


class KeeperSlots:
    """One connection to this node's keeper (one request at a time) and the slots mapped from it."""

    def __init__(self, *, cfg: Any, run_dir: str, run_id: str, secret: bytes, node: int, rank: int,
                 device: torch.device, timeout: float, event: Callable[..., None], warm: bool = False):
        """`warm`: the run persists while it trains (`Keeper.register`)."""
        self.cfg, self.run_dir, self.run_id, self.secret, self.warm = cfg, run_dir, run_id, secret, warm
        self.node, self.rank, self.device, self.timeout, self.event = node, rank, device, timeout, event
        self.keeper_dir = cfg.keeper_dir or default_keeper_dir()
        self.host = keeper_host(cfg.keeper_host)
        self.keeper: Optional[KeeperClient] = None
        self.lock = threading.Lock()
        self.blocks: list[torch.Tensor] = []
        self.pinned: list[int] = []  # cudaHostRegister'ed slot addresses
        self._maps: list[mmap.mmap] = []
        self._pin_warned = False
        self._views: dict[int, list[torch.Tensor]] = {}
        self._reserved: dict[int, int] = {}  # step -> slot begun for it in advance
        self._registered: Optional[Measurement] = None

    def find(self) -> None:
        """Attach to a keeper an earlier launch left on this node, if any (its memory may hold a restore)."""
        self.keeper = find_keeper(self.run_id, self.secret, self.node, self.keeper_dir, self.timeout)

    def address(self) -> Optional[tuple[str, int]]:
        if self.keeper is None:
            return None
        host, port = self.keeper.address.rsplit(":", 1)
        return host, int(port)

    def attach(self, measured: Measurement) -> None:
        """Start the node's keeper if there is none, register this rank's block size, map its slots."""
        if self.keeper is None:
            self.keeper = connect_keeper(self.run_dir, self.run_id, self.secret, self.node, self.host,
                                         self.keeper_dir, self.cfg.keeper_linger_s, self.timeout)
        nbytes = measured.layout.nbytes
        reply, _ = self.keeper.call("register", rank=self.rank, nbytes=nbytes, plan=measured.plan,
                                    max_block=measured.largest, warm=self.warm)
        self.unmap()
        for path in reply["paths"]:
            with open(path, "r+b") as f:
                self._maps.append(mmap.mmap(f.fileno(), nbytes))
            self.blocks.append(torch.frombuffer(self._maps[-1], dtype=torch.uint8))
        self._registered, self._reserved = measured, {}
        if self.device.type == "cuda":  # page-locked, so device-to-host copies run at full speed
            for block in self.blocks:
                self._pin(block)

    def reattach(self, step: int, err: Exception) -> None:
        """The keeper died: say so and start another one (the snapshot of `step` is lost)."""
        self.event("keeper_lost", step=step, rank=self.rank, node=self.node, error=str(err))
        self.keeper.close()
        self.keeper = None
        self.attach(self._registered)

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """The keeper's reply header to one request."""
        return self.request(op, **fields)[0]

    def request(self, op: str, **fields: Any) -> tuple[dict[str, Any], Optional[memoryview]]:
        """The keeper's reply (header, payload) to one request (`KeeperClient.call`'s fields)."""
        with self.lock:
            return self.keeper.call(op, **fields)

    def begin(self, step: int) -> int:
        """The slot the snapshot of `step` writes: the one reserved for it, else one begun now."""
        slot = self._reserved.pop(step, None)
        return slot if slot is not None else self.call("begin", rank=self.rank, step=step)["slot"]

    def reserve(self, step: int) -> None:
        """Begin the slot of the snapshot of `step` ahead of time (a failure leaves it to `begin`)."""
        try:
            self._reserved = {step: self.call("begin", rank=self.rank, step=step)["slot"]}
        except (WireError, PhalanxError):
            self._reserved = {}

    def views(self, slot: int) -> list[torch.Tensor]:
        """The tensor views of the registered layout over `slot`, made once per slot."""
        if slot not in self._views:
            self._views[slot] = self._registered.layout.views(self.blocks[slot])
        return self._views[slot]

    def memory(self, slot: int) -> memoryview:
        """The registered block of `slot`, as bytes."""
        return memoryview(self._maps[slot])[: self._registered.layout.nbytes]

    def _pin(self, block: torch.Tensor) -> None:
        code = torch.cuda.cudart().cudaHostRegister(block.data_ptr(), block.numel(), 0)
        code = int(getattr(code, "value", code))
        if code == 0:
            self.pinned.append(block.data_ptr())
        elif not self._pin_warned:
            self._pin_warned = True
            self.event("snapshot_unpinned", rank=self.rank, cuda_error=code)
            warnings.warn(f"phalanx: page-locking the keeper's shared memory failed (cudaHostRegister error {code}; "
                          f"directory {self.keeper_dir}): snapshot copies from the GPU run at pageable speed and "
                          f"the training thread waits for them. Give the keeper a directory on tmpfs "
                          f"(checkpoint.keeper_dir, default /dev/shm) and raise the locked-memory limit "
                          f"(ulimit -l).", RuntimeWarning, stacklevel=3)

    def unmap(self) -> None:
        """Unregister and unmap the current slots (a re-registration replaces them)."""
        for ptr in self.pinned:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self.pinned = []
        self.blocks, self._views = [], {}
        for old in self._maps:
            try:
                old.close()
            except BufferError:  # a tensor still views it (a restore in flight): the map closes when it goes
                pass
        self._maps = []

    def close(self, release: bool) -> None:
        """Close the connection and the maps; `release` (the run is over) lets the keeper exit."""
        if self.keeper is not None:
            if release:
                try:
                    self.call("shutdown")
                except WireError:
                    pass
            self.keeper.close()
        self.unmap()
