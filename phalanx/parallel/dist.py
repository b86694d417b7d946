"""Who a rank is (`DistContext`) and its process-group start from the torchrun environment; one process
runs without torch.distributed."""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from phalanx.errors import ConfigError
from phalanx.net import bound_socket


@dataclass
class DistContext:
    """Who this process is and what it runs on. `mesh` is None in a one-process run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: Optional[Any] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def coord(self, dim: str) -> tuple[int, int]:
        """(rank, size) of this process along mesh dimension `dim`."""
        if self.mesh is None:
            return 0, 1
        return self.mesh.get_local_rank(dim), self.mesh[dim].size()


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when absent."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    except ValueError as err:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {err}; launch with torchrun") from None


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is visible; use run.device=cpu or auto")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


START_TIMEOUT_S = 300.0


def start_process_groups(cfg, rank_order: Callable[[int, int], tuple[str, ...]]) -> DistContext:
    """Start the default process group (gloo on CPU, NCCL on CUDA) and the device mesh, if world > 1.

    `rank_order(world_size, ranks_per_node)` is the mesh order, outermost first: the planner decides it
    (`planner.placement.mesh_order`), so the caller that may import the planner passes it in."""
    rank, world, local_rank = env_world()
    device = pick_device(cfg.run.device, local_rank)
    ctx = DistContext(rank, world, local_rank, device)
    if world > 1:
        if not dist.is_initialized():
            # Ranks reach the rendezvous at different times (imports, a restore, a loaded machine), so the
            # start waits up to START_TIMEOUT_S; from then on a collective times out after
            # fault.collective_timeout_s, which may be seconds (that is how a hang is named).
            collective = datetime.timedelta(seconds=cfg.fault.collective_timeout_s)
            start = max(collective, datetime.timedelta(seconds=START_TIMEOUT_S))
            dist.init_process_group(
                backend="nccl" if device.type == "cuda" else "gloo", timeout=start,
                device_id=device if device.type == "cuda" else None,
                store=rendezvous_store(rank, world, start), rank=rank, world_size=world,
            )
            dist.distributed_c10d._set_pg_timeout(collective)
        from phalanx.parallel.layout import Layout

        # torchrun's LOCAL_WORLD_SIZE is the ranks per node; without it the run is taken as one node.
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        ctx.mesh = Layout.from_config(cfg, world, order=rank_order(world, per_node)).build_mesh(device.type)
    return ctx


def rendezvous_store(rank: int, world: int, timeout: datetime.timedelta) -> Optional[Any]:
    """The process group's key-value store, listening on MASTER_ADDR only; None under torchrun, whose agent
    runs the store its ranks share (and then `env://` finds it).

    torch's own TCPStore server binds every interface (`::`), so a run launched on loopback (a local Ray
    cluster, a test) would accept connections from the network. Rank 0 binds the socket itself and hands
    it to the store instead: on loopback for a local run, on the cluster's interface otherwise."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return None
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        raise ConfigError(f"MASTER_ADDR={host!r} MASTER_PORT={port!r}: a {world}-rank run needs both "
                          "(torchrun and `phalanx ray` set them); launch with one of those")
    if rank != 0:
        return dist.TCPStore(host, int(port), world, False, timeout)
    try:
        listener = bound_socket(host, int(port))
        listener.listen(max(world, 128))
    except OSError as err:
        raise ConfigError(f"rank 0 cannot listen on MASTER_ADDR={host} MASTER_PORT={port}: {err}; "
                          "pick a free port, or an address of this machine") from None
    # the store owns the socket from here (it closes it when it is destroyed)
    return dist.TCPStore(host, int(port), world, True, timeout, wait_for_workers=False,
                         master_listen_fd=listener.detach())


def shutdown() -> None:
    """Destroy every process group, and collect what held them: a gloo group closes its sockets (which tells
    its peers at once) only when its last reference goes, and modules keep reference cycles."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's `obj` on every rank (decisions made once: run dir, checkpoint to resume)."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
