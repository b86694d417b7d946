"""The wire of Ulysses sequence parallelism: all-to-all between sequence and head sharding, with autograd.

Sequence-sharded tensors are (B, T/sp, H, D); head-sharded ones are (B, T, H/sp, D). Each direction
makes one copy into a send buffer laid out (sp, B, T/sp, heads, D) — chunk j goes to rank j — and
one copy out of the receive buffer. q, k and v travel in one packed all-to-all. Head-sharded
outputs are views over (B, H/sp, T, D) memory, the layout the attention kernel reads, so the
kernel's transpose costs nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from phalanx.telemetry import comm


def _exchange(parts: Sequence[torch.Tensor], group: dist.ProcessGroup, sp: int) -> list[torch.Tensor]:
    """Send parts[i] viewed as (sp, B, T/sp, h_i, D) chunk-wise; returns the received (sp, B, T/sp, h_i, D) parts."""
    widths = [p.shape[3] for p in parts]
    send = torch.empty(*parts[0].shape[:3], sum(widths), parts[0].shape[4], dtype=parts[0].dtype,
                       device=parts[0].device)
    for dest, part in zip(send.split(widths, dim=3), parts):
        dest.copy_(part)
    recv = torch.empty_like(send)
    comm.all_to_all_single(recv, send, group, "sp")
    return list(recv.split(widths, dim=3))


def seq_to_heads(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup, sp: int) -> list[torch.Tensor]:
    """Each (B, T/sp, h, D) -> (B, T, h/sp, D): scatter heads, gather sequence; one all-to-all for all."""
    # chunk j of the send buffer: my tokens of rank j's heads
    parts = [t.unflatten(2, (sp, t.shape[2] // sp)).permute(2, 0, 1, 3, 4) for t in tensors]
    out = []
    for recv, t in zip(_exchange(parts, group, sp), tensors):
        B, Tl, h, D = t.shape
        # recv[j]: rank j's tokens of my heads -> (B, h/sp, T, D) memory, returned as a (B, T, h/sp, D) view
        out.append(recv.permute(1, 3, 0, 2, 4).reshape(B, h // sp, sp * Tl, D).transpose(1, 2))
    return out


def heads_to_seq(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup, sp: int) -> list[torch.Tensor]:
    """Each (B, T, h/sp, D) -> (B, T/sp, h, D): scatter sequence, gather heads; one all-to-all for all."""
    # chunk j of the send buffer: tokens of rank j's sequence shard, my heads
    parts = [t.unflatten(1, (sp, t.shape[1] // sp)).permute(1, 0, 2, 3, 4) for t in tensors]
    out = []
    for recv, t in zip(_exchange(parts, group, sp), tensors):
        B, T, hl, D = t.shape
        out.append(recv.permute(1, 2, 0, 3, 4).reshape(B, T // sp, sp * hl, D))  # recv[j]: rank j's heads
    return out


class SeqToHeads(torch.autograd.Function):
    """(q, k, v) sequence-sharded -> head-sharded; the backward sends the gradients back the other way."""

    @staticmethod
    def forward(ctx, group: dist.ProcessGroup, sp: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.group, ctx.sp = group, sp
        return tuple(seq_to_heads(tensors, group, sp))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        return (None, None, *heads_to_seq(grads, ctx.group, ctx.sp))


class HeadsToSeq(torch.autograd.Function):
    """The attention output, head-sharded -> sequence-sharded; the backward is the other direction."""

    @staticmethod
    def forward(ctx, group: dist.ProcessGroup, sp: int, x: torch.Tensor) -> torch.Tensor:
        ctx.group, ctx.sp = group, sp
        return heads_to_seq([x], group, sp)[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None, seq_to_heads([grad], ctx.group, ctx.sp)[0]
