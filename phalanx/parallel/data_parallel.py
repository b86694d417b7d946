"""Data parallelism back ends over the flattened dp x sp group: `ddp` (DistributedDataParallel), `fsdp` (FSDP2)."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

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


@contextlib.contextmanager
def no_sync(model: nn.Module, active: bool) -> Iterator[None]:
    """Skip the gradient reduction on accumulation micro-steps (DDP's no_sync, FSDP2's gradient sync flag)."""
    if active and isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2 module
        model.set_requires_gradient_sync(not active)
        yield
    else:
        yield


@register("data", "fsdp")
class FSDPStrategy:
    """FSDP2: `fully_shard` per block, then the root, over dp x sp; parameters sharded on the meta model.

    With train.dtype=bf16 the policy gathers parameters in bf16 and reduces gradients in fp32;
    master weights and optimizer state stay fp32 shards.
    """

    on_meta = True  # sharding happens before materialisation: no rank ever holds the whole model

    @staticmethod
    def validate(dims: Any, cfg: Any) -> None:
        return None

    @staticmethod
    def apply(model: nn.Module, mesh: Any, cfg: Any) -> nn.Module:
        if mesh is None or mesh[DATA_DIM].size() == 1:
            return model
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        bf16 = cfg.train.dtype == "bf16"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                      reduce_dtype=torch.float32 if bf16 else None)
        shard_mesh = mesh[DATA_DIM]
        blocks = list(model.layers.values())
        for i, block in enumerate(blocks):
            # The last block's parameters are needed again at once by backward: keep them gathered.
            fully_shard(block, mesh=shard_mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
        fully_shard(model, mesh=shard_mesh, mp_policy=policy)
        return model
