"""Data parallelism back ends. `ddp`: torch DistributedDataParallel over the mesh's dp group."""

from __future__ import annotations

from typing import Any

import contextlib
import inspect

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from phalanx.parallel.registry import register


_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters


@register("data", "ddp")
class DDPStrategy:
    """Gradients averaged over the dp group by DDP's bucketed all-reduce, overlapped with backward."""

    @staticmethod
    def validate(dims: Any, cfg: Any) -> None:
        return None

    @staticmethod
    def apply(model: nn.Module, mesh: Any, cfg: Any) -> nn.Module:
        if mesh is None or mesh["dp"].size() == 1:
            return model
        device = next(model.parameters()).device
        # DDP broadcasts rank 0's parameters at construction. The only buffers (RoPE tables) are
        # derived and identical on every rank, so they are not re-broadcast before each forward.
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS
                          else {"broadcast_buffers": False})
        return DistributedDataParallel(
            model,
            process_group=mesh["dp"].get_group(),
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            **no_buffer_sync,
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside any data-parallel wrapper."""
    while isinstance(model, DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, DistributedDataParallel) else model._orig_mod
    return model


def no_sync(model: nn.Module, active: bool) -> Any:
    """Skip the gradient all-reduce on accumulation micro-steps (DDP only)."""
    if active and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()

