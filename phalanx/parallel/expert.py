"""Expert parallelism (`parallel.ep`): the experts of each MoE layer are a DTensor over the (edp, ep)
mesh, Shard(0) over ep (each ep rank owns E/ep consecutive experts) and Replicate over edp. Tokens
travel by all-to-all with exchanged split sizes; expert gradients are summed over edp and divided
by dp x sp here (`ExpertParallel.reduce_gradients`), dense gradients stay with the data-parallel
back end, which leaves DTensor parameters it does not own alone. Routing and the expert math are
the model's (`models/routing.py`, `models/experts.py`, `models/moe.py`); this is the wire and the strategy.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from phalanx.errors import ConfigError
from phalanx.models.moe import A2ACounter, ExpertFn, MoE
from phalanx.models.routing import STAT_ASSIGNED, STAT_AUX, STAT_DROPPED, STAT_LOAD, STAT_Z, SequenceShards
from phalanx.parallel.expert_comm import AllToAllRows, exchange_counts
from phalanx.parallel.layout import Layout
from phalanx.parallel.mesh import EXPERT_DATA_DIM, EXPERT_DIM
from phalanx.parallel.registry import register
from phalanx.telemetry import comm

# ---- dispatch ------------------------------------------------------------------------------


class PermuteRows(torch.autograd.Function):
    """x[order] for a permutation `order`; its backward scatters without accumulation (each row once)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(order)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (order,) = ctx.saved_tensors
        return torch.empty_like(grad).index_copy_(0, order, grad), None


class AllToAllDispatch:
    """Experts sharded over the ep group: rows for expert e go to rank e // (E / ep) and come back.

    Received rows arrive grouped by (source rank, local expert); they are regrouped by local expert
    for the matmuls and put back in arrival order before the return trip.
    """

    def __init__(self, group: dist.ProcessGroup, ep: int) -> None:
        self.group, self.ep = group, ep
        self.counter = A2ACounter()

    def __call__(self, rows: torch.Tensor, counts: torch.Tensor, experts: ExpertFn) -> torch.Tensor:
        recv_counts = exchange_counts(counts, self.group)  # (ep, E_local)
        # One host sync for the split sizes (as in every dropless MoE); tiny, after the router.
        splits = torch.stack([counts.view(self.ep, -1).sum(1), recv_counts.sum(1)]).tolist()
        in_splits, out_splits = splits
        received = AllToAllRows.apply(rows, self.group, out_splits, in_splits, self.counter)
        local_experts = recv_counts.shape[1]
        expert_of_row = torch.arange(local_experts, device=rows.device).repeat(self.ep).repeat_interleave(
            recv_counts.flatten())
        order = torch.argsort(expert_of_row, stable=True)
        out = experts(PermuteRows.apply(received, order), recv_counts.sum(0))
        back = PermuteRows.apply(out, torch.argsort(order))  # arrival order again
        return AllToAllRows.apply(back, self.group, in_splits, out_splits, self.counter)


# ---- metrics -------------------------------------------------------------------------------


def moe_metrics(layers: list[nn.Module], group: Optional[dist.ProcessGroup], accumulation: int) -> dict[str, float]:
    """Routing metrics since the last call, averaged over layers and the dp x sp ranks (`group`).

    aux_loss and z_loss are means per forward; dropped is the share of assignments dropped;
    imbalance is the most loaded expert's assignments over the mean (1.0 = perfect), averaged over
    layers; all-to-all bytes and seconds are this rank's, per step.
    """
    stats = torch.stack([layer.take_stats() for layer in layers])  # (layers, 5 + E): forwards first
    a2a = torch.tensor([layer.dispatch.counter.take() for layer in layers], dtype=torch.float64).sum(0)
    steps = max(1.0, float(stats[0, 0]) / accumulation)  # optimizer steps since the last call
    if group is not None:
        comm.all_reduce(stats, group, "dp_sp")
    forwards, rest = stats[:, 0].clamp(min=1), stats[:, 1:]
    load = rest[:, STAT_LOAD:]
    return {
        "moe_aux_loss": float((rest[:, STAT_AUX] / forwards).mean()),
        "moe_z_loss": float((rest[:, STAT_Z] / forwards).mean()),
        "moe_dropped": float(rest[:, STAT_DROPPED].sum() / rest[:, STAT_ASSIGNED].sum().clamp(min=1)),
        "moe_imbalance": float((load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)).mean()),
        "moe_a2a_bytes": float(a2a[0]) / steps,
        "moe_a2a_seconds": float(a2a[1]) / steps,
    }


# ---- the strategy --------------------------------------------------------------------------


def moe_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def is_expert_param(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor) and param.device_mesh.mesh_dim_names == (EXPERT_DATA_DIM, EXPERT_DIM)


@register("expert", "alltoall")
class ExpertParallel:
    """Shards experts over ep and wires every MoE layer to its sequence (sp) and expert (ep) groups."""

    on_meta = True

    @staticmethod
    def validate(layout: Layout, cfg: Any) -> None:
        moe, ep = cfg.model.moe, layout.ep
        if ep == 1:
            return
        if not moe.num_experts:
            raise ConfigError(f"parallel.ep={ep} shards mixture-of-experts layers, but model.moe.num_experts=0; "
                              f"set model.moe.num_experts (a multiple of {ep}) or parallel.ep=1")
        if moe.num_experts % ep:
            raise ConfigError(f"model.moe.num_experts({moe.num_experts}) is not divisible by parallel.ep({ep}); "
                              f"each ep rank holds num_experts/ep experts")
        if cfg.parallel.dp_backend == "zero":
            raise ConfigError(
                f"parallel.ep={ep} with parallel.dp_backend=zero: DeepSpeed's ZeRO optimizer flattens parameters into "
                f"its own partitions and cannot hold experts sharded over ep; use dp_backend=ddp or fsdp with ep, or "
                f"zero with parallel.ep=1 (experts then replicate like dense weights)")

    @staticmethod
    def apply(model: nn.Module, mesh: Any, cfg: Any) -> nn.Module:
        layers = moe_layers(model)
        if not layers or mesh is None:
            return model
        p = cfg.parallel
        sp = mesh["sp"].size()
        seq = SequenceShards(mesh["sp"].get_group(), sp, mesh.get_local_rank("sp")) if sp > 1 else SequenceShards()
        expert_mesh = None
        if p.ep > 1:
            expert_mesh = Layout.from_config(cfg, mesh.world.size()).expert_mesh(mesh)
        for layer in layers:
            layer.sequence = seq
            if expert_mesh is not None:
                layer.shard_experts(expert_mesh)
                layer.dispatch = AllToAllDispatch(expert_mesh[EXPERT_DIM].get_group(), p.ep)
        return model

    @staticmethod
    @torch.no_grad()
    def reduce_gradients(model: nn.Module) -> None:
        """Expert gradients: sum over the ranks holding the same experts (edp), then the dp x sp mean."""
        for param in model.parameters():
            if param.grad is None or not is_expert_param(param):
                continue
            mesh, local = param.device_mesh, param.grad.to_local()
            if mesh[EXPERT_DATA_DIM].size() > 1:
                comm.all_reduce(local, mesh[EXPERT_DATA_DIM].get_group(), EXPERT_DATA_DIM)
            local.div_(mesh.size())
