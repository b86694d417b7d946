"""Mixture-of-experts machinery: routing, capacity, expert matmuls, token dispatch, expert parallelism.

Statistics are per *sequence*, the unit no layout splits except sequence parallelism:
  * capacity: each expert takes at most ceil(capacity_factor * T * k / E) assignments of one
    sequence of T tokens; top-1 choices of all tokens first, then top-2, ..., each in token order
    (GShard's priority). Under sp the T tokens are spread over the sp ranks; an all-gather of
    per-rank counts gives each rank its place in that order.
  * load-balancing loss (Switch/GShard form, E * sum_e f_e * P_e) and its statistics are computed
    per sequence and averaged, like DeepSeek-V3's sequence-wise balance loss.
So drop decisions, the aux loss and its gradients are the same for any dp, ep, micro-batching or
pipeline degree: the complaint "aux loss changes with the pipeline degree" cannot arise.

The aux and z losses enter backward through `AuxLossInjector` (Megatron's MoEAuxLossAutoScaler
idea): the model's output is unchanged and the trainer's loss needs no MoE term, so pipeline
stages and wrappers need not carry it.

Expert parallelism (`parallel.ep`): the experts of each MoE layer are a DTensor over the (edp, ep)
mesh, Shard(0) over ep (each ep rank owns E/ep consecutive experts) and Replicate over edp. Tokens
travel by all-to-all with exchanged split sizes; expert gradients are summed over edp and divided
by dp x sp here (`ExpertParallel.reduce_gradients`), dense gradients stay with the data-parallel
back end, which leaves DTensor parameters it does not own alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from phalanx.errors import ConfigError
from phalanx.telemetry import comm
from phalanx.parallel.expert_comm import A2ACounter, AllToAllRows, exchange_counts
from phalanx.parallel.mesh import EXPERT_DATA_DIM, EXPERT_DIM, ParallelDims
from phalanx.parallel.registry import register

# ---- routing -------------------------------------------------------------------------------


@dataclass
class SequenceShards:
    """Where one sequence's tokens live: on `size` sp ranks (this is `rank`), or all here."""

    group: Optional[dist.ProcessGroup] = None
    size: int = 1
    rank: int = 0


@dataclass
class Routing:
    experts: torch.Tensor  # (N, k) expert of each assignment
    weights: torch.Tensor  # (N, k) combine weights, 0 where dropped
    keep: Optional[torch.Tensor]  # (N, k) bool, None when dropless
    aux_loss: torch.Tensor  # this rank's share of the balance loss (its gradient is exact; see route)
    z_loss: torch.Tensor
    stats: torch.Tensor  # detached (4 + E,): aux, z, dropped, assignments, assignments per expert


STAT_AUX, STAT_Z, STAT_DROPPED, STAT_ASSIGNED, STAT_LOAD = 0, 1, 2, 3, 4


def capacity(capacity_factor: float, seq_len: int, top_k: int, num_experts: int) -> int:
    """Assignments one expert accepts from one sequence."""
    return max(1, math.ceil(capacity_factor * seq_len * top_k / num_experts))


def route(x: torch.Tensor, router_weight: torch.Tensor, cfg: Any, seq: SequenceShards) -> Routing:
    """Route (B, T, d) tokens (T of the sequence's T * seq.size here) to top-k experts; fp32 throughout."""
    B, T, _ = x.shape
    E, k = cfg.num_experts, cfg.top_k
    logits = F.linear(x.float(), router_weight.float())  # (B, T, E)
    z_loss = torch.logsumexp(logits, dim=-1).square().mean()
    if cfg.score == "softmax":
        scores = probs = logits.softmax(dim=-1)
    else:  # sigmoid scores; the balance loss uses them normalised over experts (DeepSeek-V3)
        scores = logits.sigmoid()
        probs = scores / scores.sum(dim=-1, keepdim=True)
    top_w, top_e = scores.topk(k, dim=-1)  # (B, T, k)
    if k > 1 and (cfg.norm_topk or cfg.score == "sigmoid"):
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)

    # Per-sequence counts and router mass, completed over the sp ranks holding the sequence.
    onehot = F.one_hot(top_e, E)  # (B, T, k, E)
    counts = onehot.sum(dim=(1, 2))  # (B, E)
    prob_sum = probs.sum(dim=1)  # (B, E), carries the gradient
    seq_len = T * seq.size
    if seq.size > 1:
        packed = torch.cat([counts.to(prob_sum.dtype), prob_sum.detach()], dim=-1)
        comm.all_reduce(packed, seq.group, "sp")
        full_counts, full_probs = packed.split(E, dim=-1)
    else:
        full_counts, full_probs = counts.to(prob_sum.dtype), prob_sum.detach()
    f = full_counts / (seq_len * k)  # share of the sequence's assignments per expert
    # Gradient: each sp rank holds part of P_e; the data-parallel mean over dp x sp divides by sp,
    # so the local share is scaled by sp to give exactly the one-process gradient.
    aux_loss = E * (f * prob_sum).sum(dim=-1).mean() / seq_len * seq.size
    aux_value = E * (f * full_probs).sum(dim=-1).mean() / seq_len

    keep = None
    dropped = torch.zeros((), device=x.device)
    if cfg.capacity_factor is not None:
        keep = _within_capacity(onehot, capacity(cfg.capacity_factor, seq_len, k, E), seq)
        top_w = top_w * keep
        dropped = (~keep).sum().to(torch.float32)
    stats = torch.cat([torch.stack([aux_value.float(), z_loss.detach().float(), dropped,
                                    torch.tensor(float(B * T * k), device=x.device)]),
                       counts.sum(0).float()])
    return Routing(top_e.flatten(0, 1), top_w.flatten(0, 1), None if keep is None else keep.flatten(0, 1),
                   aux_loss, z_loss, stats)


def _within_capacity(onehot: torch.Tensor, cap: int, seq: SequenceShards) -> torch.Tensor:
    """(B, T, k) mask of assignments an expert accepts: slot-major, then token order, over the sequence."""
    m = onehot.transpose(1, 2)  # (B, k, T, E)
    before_here = m.cumsum(dim=2) - m  # earlier tokens of this rank, same slot and expert
    slot_counts = m.sum(dim=2)  # (B, k, E)
    if seq.size > 1:
        every = comm.all_gather(slot_counts, seq.group, "sp")  # (sp, B, k, E)
        earlier_ranks, slot_total = every[: seq.rank].sum(dim=0), every.sum(dim=0)
    else:
        earlier_ranks, slot_total = 0, slot_counts
    earlier_slots = slot_total.cumsum(dim=1) - slot_total  # every token's earlier-slot choices come first
    place = before_here + (earlier_ranks + earlier_slots).unsqueeze(2)
    return ((place * m).sum(dim=-1) < cap).transpose(1, 2)  # (B, T, k)


class AuxLossInjector(torch.autograd.Function):
    """Returns `out` unchanged; in backward, gives `loss` the gradient `scale` (as if added to the loss)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.scale), None


# ---- expert matmuls ------------------------------------------------------------------------


class GroupedMM(torch.autograd.Function):
    """out[rows of group e] = x[rows of group e] @ w[e] with `torch._grouped_mm`; rows sorted by group.

    torch's own autograd for `_grouped_mm` needs contiguous, 16-byte-aligned gradients (a broadcast
    gradient fails on CPU), so both backward products are written out here.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, offsets)
        return torch._grouped_mm(x, w, offs=offsets)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, w, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        dx = torch._grouped_mm(grad, w.transpose(-2, -1), offs=offsets)
        dw = torch._grouped_mm(x.t(), grad, offs=offsets)  # (d, M) x (M, F) summed per group -> (E, d, F)
        return dx, dw, None


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """Whether `torch._grouped_mm` runs here: CPU (any float dtype), CUDA sm90+ in bf16; aligned rows."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if any((d * torch.finfo(dtype).bits // 8) % 16 for d in dims):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return device.type == "cpu"


class ExpertLoop(torch.autograd.Function):
    """SwiGLU experts one expert at a time, forward and backward written out (the CPU kernel).

    Each expert's rows go through matmul, silu, product and matmul while they are in cache, and
    weight gradients are written straight into their expert's slice: on CPU this beats one grouped
    matmul per projection followed by elementwise passes over all rows (benchmarks/RESULTS.md), and
    autograd through `w[e]` would allocate a whole stacked gradient per expert.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                splits: list[int]) -> torch.Tensor:
        rows, hidden = x.shape[0], w1.shape[-1]
        out, gate, up = x.new_empty((rows, w2.shape[-1])), x.new_empty((rows, hidden)), x.new_empty((rows, hidden))
        for e, (xs, gs, us, os_) in enumerate(zip(*(t.split(splits) for t in (x, gate, up, out)))):
            if xs.shape[0]:
                torch.mm(xs, w1[e], out=gs)
                torch.mm(xs, w3[e], out=us)
                torch.mm(F.silu(gs) * us, w2[e], out=os_)
        ctx.save_for_backward(x, w1, w3, w2, gate, up)
        ctx.splits = splits
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, w1, w3, w2, gate, up = ctx.saved_tensors
        grad = grad.contiguous()
        dx = torch.empty_like(x)
        dw1, dw3, dw2 = torch.zeros_like(w1), torch.zeros_like(w3), torch.zeros_like(w2)  # idle experts: 0
        for e, (xs, gr, gs, us, dxs) in enumerate(zip(*(t.split(ctx.splits) for t in (x, grad, gate, up, dx)))):
            if not xs.shape[0]:
                continue
            silu = F.silu(gs)
            torch.mm((silu * us).t(), gr, out=dw2[e])
            d_hidden = gr @ w2[e].t()
            d_up = d_hidden * silu
            d_gate = torch.ops.aten.silu_backward(d_hidden.mul_(us), gs)  # one fused kernel for silu'(g)
            torch.mm(xs.t(), d_gate, out=dw1[e])
            torch.mm(xs.t(), d_up, out=dw3[e])
            torch.mm(d_gate, w1[e].t(), out=dxs)
            dxs.addmm_(d_up, w3[e].t())
        return dx, dw1, dw3, dw2, None


def swiglu_experts(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor,
                   kernel: str) -> torch.Tensor:
    """SwiGLU of each row of x (M, d), sorted by expert with `counts` (E_local,) rows per expert.

    w1 (gate), w3 (up): (E_local, d, F); w2 (down): (E_local, F, d). `kernel`: grouped_mm (one
    `torch._grouped_mm` per projection: the GPU path) or loop (`ExpertLoop`: the CPU path, and the
    fallback where grouped_mm is missing); auto picks grouped_mm on CUDA where supported, else loop.
    """
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x, w1, w3, w2 = (t.to(dtype) for t in (x, w1, w3, w2))
    if kernel == "auto":
        on_gpu = x.device.type == "cuda" and grouped_mm_supported(x.device, dtype, *w1.shape[1:], w2.shape[-1])
        kernel = "grouped_mm" if on_gpu else "loop"
    if kernel == "grouped_mm":
        offsets = counts.cumsum(0).to(torch.int32)
        gate, up = GroupedMM.apply(x, w1, offsets), GroupedMM.apply(x, w3, offsets)
        return GroupedMM.apply(F.silu(gate) * up, w2, offsets)
    return ExpertLoop.apply(x, w1, w3, w2, counts.tolist())


# ---- dispatch ------------------------------------------------------------------------------

ExpertFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rows sorted by local expert, counts) -> rows


class LocalDispatch:
    """All experts on this rank: the sorted rows go straight to them."""

    def __init__(self) -> None:
        self.counter = A2ACounter()

    def __call__(self, rows: torch.Tensor, counts: torch.Tensor, experts: ExpertFn) -> torch.Tensor:
        return experts(rows, counts)


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


def moe_combine(x: torch.Tensor, routing: Routing, num_experts: int, dispatch: Any, experts: ExpertFn) -> torch.Tensor:
    """(N, d) tokens -> (N, d): each token's kept assignments through their experts, weighted and summed."""
    N, k = routing.experts.shape
    chosen = routing.experts.flatten()
    if routing.keep is not None:
        assignments = routing.keep.flatten().nonzero().squeeze(1)
    else:
        assignments = torch.arange(N * k, device=x.device)
    experts_of = chosen[assignments]
    assignments = assignments[torch.argsort(experts_of, stable=True)]  # sorted by expert
    counts = torch.bincount(experts_of, minlength=num_experts)
    out = dispatch(x.index_select(0, assignments // k), counts, experts)  # (assignments, d)
    slots = out.new_zeros((N * k, out.shape[-1])).index_copy(0, assignments, out)
    return (slots.view(N, k, -1) * routing.weights.unsqueeze(-1).to(out.dtype)).sum(dim=1)


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
    from phalanx.models.moe import MoE

    return [m for m in model.modules() if isinstance(m, MoE)]


def is_expert_param(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor) and param.device_mesh.mesh_dim_names == (EXPERT_DATA_DIM, EXPERT_DIM)


@register("expert", "alltoall")
class ExpertParallel:
    """Shards experts over ep and wires every MoE layer to its sequence (sp) and expert (ep) groups."""

    on_meta = True

    @staticmethod
    def validate(dims: ParallelDims, cfg: Any) -> None:
        moe, ep = cfg.model.moe, dims.ep
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
            dims = ParallelDims(dp=p.dp, sp=p.sp, ep=p.ep, pp=p.pp, world_size=mesh.world.size())
            expert_mesh = dims.expert_mesh(mesh)
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
