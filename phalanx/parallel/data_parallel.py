"""Data parallelism back ends. `ddp`: torch DistributedDataParallel over the flattened dp x sp group."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from phalanx.parallel import comm
from phalanx.parallel.mesh import DATA_DIM
from phalanx.parallel.registry import register

_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters


@register("data", "ddp")
class DDPStrategy:
    """Gradients averaged over dp x sp by DDP's bucketed all-reduce, overlapped with backward."""

    on_meta = False  # DDP wraps a materialised model

    @staticmethod
    def validate(dims: Any, cfg: Any) -> None:
        return None

    @staticmethod
    def apply(model: nn.Module, mesh: Any, cfg: Any) -> nn.Module:
        if mesh is None or mesh[DATA_DIM].size() == 1:
            return model
        device = next(model.parameters()).device
        # DDP broadcasts rank 0's parameters at construction. The only buffers (RoPE tables) are
        # derived and identical on every rank, so they are not re-broadcast before each forward.
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS
                          else {"broadcast_buffers": False})
        ddp = DistributedDataParallel(
            model,
            process_group=mesh[DATA_DIM].get_group(),
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            **no_buffer_sync,
        )
        if cfg.parallel.comm_stats:
            ddp.register_comm_hook(mesh[DATA_DIM].get_group(), comm.ddp_counting_hook(DATA_DIM))
        return ddp


def no_sync(model: nn.Module, active: bool) -> Any:
    """Skip the gradient all-reduce on accumulation micro-steps (DDP only)."""
    if active and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()
