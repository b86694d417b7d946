"""Mixture-of-experts routing: top-k choice, capacity, and the balance and z losses.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from phalanx.telemetry import comm


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
