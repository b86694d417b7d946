"""Data parallelism back ends over the flattened dp x sp group: `ddp`, `fsdp` (FSDP2), `zero` (DeepSpeed).

A back end owns what differs between them: how the model is wrapped, how a micro-batch's backward
accumulates, how the optimizer steps (clipping included) and how model and optimizer state are
saved. The trainer calls these and nothing else, so its step, clipping, grad-norm metric and
state_dict read the same for every back end.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from phalanx.parallel.mesh import DATA_DIM
from phalanx.parallel.registry import register
from phalanx.telemetry import comm, health

_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters
# find_unused_parameters is set on CPU for its fixed bucket layout (see DDPStrategy), not for unused
# parameters. torch warns about it from C++ (each rank, once, in backward), past Python's warning filters:
# rank 0 says once, beside it, that it is expected.
_EXPECTED_DDP_WARNING = ("phalanx: DDP on CPU runs with find_unused_parameters=True so that every launch sums "
                         "gradients in one bucket order (bit-exact resume); torch's warning that it found no "
                         "unused parameters is expected")


class TorchDataParallel:
    """Shared by the torch back ends: a torch optimizer stepped by the trainer, DCP-native state."""

    on_meta = False  # True: wraps the meta model, before materialisation
    snapshots_every_step = True  # False: its state_dict() may not be taken between steps (see zero.py)

    @staticmethod
    def validate(layout: Any, cfg: Any) -> None:
        return None

    @staticmethod
    def wrap_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, mesh: Any, cfg: Any) -> nn.Module:
        """Back ends that own the optimizer step (DeepSpeed) wrap here; torch back ends need not."""
        return model

    @staticmethod
    @contextlib.contextmanager
    def accumulate(model: nn.Module, sync: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: reduce gradients only when `sync`."""
        if isinstance(model, DistributedDataParallel) and not sync:
            with model.no_sync():
                yield
            return
        if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
            model.set_requires_gradient_sync(sync)
        yield

    @staticmethod
    def backward(model: nn.Module, loss: torch.Tensor) -> None:
        loss.backward()

    @staticmethod
    def reduce_pipeline_gradients(model: nn.Module, mesh: Any) -> None:
        """After a step's pipeline schedule runs: back ends that do not reduce inside the stages do it here."""
        return None

    @staticmethod
    def step(model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float,
             pp_group: Optional[Any] = None) -> torch.Tensor:
        """Clip to `max_norm`, step, clear gradients; returns the global grad norm before clipping.
        `pp_group`: the other pipeline stages, whose gradients count in the global norm."""
        grad_norm = clip_grad_norm(model.parameters(), max_norm, pp_group)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @staticmethod
    def state_dict(model: nn.Module, optimizer: Any) -> tuple[dict, dict]:
        """(model, optimizer) state keyed by parameter name, sharded as DTensors where the model is: no layout in
        it but the shards' placement, which DCP reshards on load. Every back end saves this form.

        Taken before the first step (the snapshot engine measures the state layout then), torch creates
        the optimizer's state with a zero-learning-rate step: parameters and moments stay as they were,
        but the step counters read 1. They are set back to 0 in place, so the first real step computes
        exactly what a fresh optimizer computes (bias correction included)."""
        fresh = not optimizer.state
        model_state, optim_state = get_state_dict(model, optimizer)
        if fresh:
            for state in optimizer.state.values():
                step = state.get("step")
                if isinstance(step, torch.Tensor):
                    step.zero_()
                elif step is not None:
                    state["step"] = 0
        return model_state, optim_state

    @staticmethod
    def load_state_dict(model: nn.Module, optimizer: Any, model_state: dict, optim_state: dict) -> None:
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def placed_elsewhere(param: torch.Tensor) -> bool:
    """A parameter another strategy already placed on its own mesh (experts over ep): data parallelism
    neither wraps nor reduces it; its owner reduces its gradients."""
    return isinstance(param, DTensor)


def clip_grad_norm(params: Iterator[torch.Tensor], max_norm: float, pp_group: Optional[Any] = None) -> torch.Tensor:
    """`nn.utils.clip_grad_norm_` for parameters on several meshes (FSDP shards, ep-sharded experts, plain).

    The norm of each group is taken on its own mesh (DTensor reduces its shards), and the groups'
    norms combine as sqrt(sum of squares); one group reads exactly like `clip_grad_norm_`.
    """
    groups: dict[Any, list[torch.Tensor]] = {}
    for param in params:
        if param.grad is not None:
            key = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
            groups.setdefault(key, []).append(param)
    norms = []
    for members in groups.values():
        norm = nn.utils.get_total_norm([p.grad for p in members], foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if pp_group is not None:  # stages hold disjoint parameters: squares add up over the pipeline
        device = norms[0].device if norms else torch.device("cpu")
        squares = sum((n.to(device).square() for n in norms), torch.zeros((), device=device))
        comm.all_reduce(squares, pp_group, "pp")
        total = squares.sqrt()
    elif not norms:
        return torch.zeros(())
    else:
        total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    for members in groups.values():
        nn.utils.clip_grads_with_norm_(members, max_norm, total, foreach=True)
    return total


@register("data", "ddp")
class DDPStrategy(TorchDataParallel):
    """Gradients averaged over dp x sp by DDP's bucketed all-reduce, overlapped with backward."""

    @staticmethod
    def apply(model: nn.Module, mesh: Any, cfg: Any) -> nn.Module:
        if mesh is None or mesh[DATA_DIM].size() == 1 or cfg.parallel.pp > 1:
            return model  # pipeline stages: see reduce_pipeline_gradients
        device = next(model.parameters()).device
        # DDP broadcasts rank 0's parameters at construction. The only buffers (RoPE tables) are
        # derived and identical on every rank, so they are not re-broadcast before each forward.
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS
                          else {"broadcast_buffers": False})
        elsewhere = [name for name, param in model.named_parameters() if placed_elsewhere(param)]
        if elsewhere:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, elsewhere)
        ddp = DistributedDataParallel(
            model,
            process_group=mesh[DATA_DIM].get_group(),
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            # DDP rebuilds its buckets once, after the first step of each launch. A resumed run would
            # then sum the first steps' gradients in a different order over > 2 ranks (1e-9 apart),
            # breaking the CPU promise of bit-exact resume; with this flag DDP never rebuilds, so
            # every launch uses one bucket layout. (Its per-step graph walk costs little on CPU.)
            find_unused_parameters=device.type == "cpu",
            **no_buffer_sync,
        )
        if device.type == "cpu" and torch.distributed.get_rank() == 0:
            print(_EXPECTED_DDP_WARNING, file=sys.stderr, flush=True)
        if cfg.parallel.comm_stats or health.HEALTH.enabled:  # counted, and seen by the controller's watchdog
            ddp.register_comm_hook(mesh[DATA_DIM].get_group(), comm.ddp_counting_hook(DATA_DIM))
        return ddp

    @staticmethod
    @torch.no_grad()
    def reduce_pipeline_gradients(model: nn.Module, mesh: Any) -> None:
        """Pipeline stages are not wrapped in DDP: a DDP module driven by torch's pipeline schedules
        resumed 1e-8 away from an uninterrupted run (its reducer state differs on a launch's first
        step), breaking exact resume. Instead the step's gradients are averaged here, after the
        schedule, in one flat all-reduce in parameter order: deterministic, and like DDP's default
        hook (divide, then sum). It forgoes DDP's overlap of the reduction with backward."""
        if mesh[DATA_DIM].size() == 1:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None and not placed_elsewhere(p)]
        if not grads:
            return
        flat = torch.cat([g.flatten() for g in grads]).div_(mesh[DATA_DIM].size())
        comm.all_reduce(flat, mesh[DATA_DIM].get_group(), DATA_DIM)
        torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])


@register("data", "fsdp")
class FSDPStrategy(TorchDataParallel):
    """FSDP2: `fully_shard` per block, then the root, over dp x sp; parameters sharded on the meta model.

    Parameters another strategy placed on its own mesh (ep-sharded experts) are left to it.

    With train.dtype=bf16 the policy gathers parameters in bf16 and reduces gradients in fp32;
    master weights and optimizer state stay fp32 shards.
    """

    on_meta = True  # sharding happens before materialisation: no rank ever holds the whole model

    @staticmethod
    def apply(model: nn.Module, mesh: Any, cfg: Any) -> nn.Module:
        if mesh is None or mesh[DATA_DIM].size() == 1:
            return model
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        bf16 = cfg.train.dtype == "bf16"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                      reduce_dtype=torch.float32 if bf16 else None)
        shard_mesh = mesh[DATA_DIM]
        blocks = list(model.layers.values())
        elsewhere = {param for param in model.parameters() if placed_elsewhere(param)} or None
        for i, block in enumerate(blocks):
            # The last block's parameters are needed again at once by backward: keep them gathered.
            fully_shard(block, mesh=shard_mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1,
                        ignored_params=elsewhere)
        fully_shard(model, mesh=shard_mesh, mp_policy=policy, ignored_params=elsewhere)
        if cfg.parallel.comm_stats:  # FSDP's own collectives, counted like every other one
            for module in [*blocks, model]:
                gather, scatter = comm.fsdp_counting_comms(DATA_DIM)
                module.set_custom_all_gather(gather)
                module.set_custom_reduce_scatter(scatter)
        return model
