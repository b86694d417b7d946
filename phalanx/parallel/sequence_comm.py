"""The wire of Ulysses sequence parallelism: all-to-all between sequence and head sharding, with autograd.

A tensor (B, T/sp, H, D) sharded by sequence becomes (B, T, H/sp, D) sharded by heads, and back.
The backward of one direction is the other direction applied to the gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from phalanx.parallel import comm


def seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup, sp: int) -> torch.Tensor:
    """(B, T/sp, H, D) -> (B, T, H/sp, D): scatter heads, gather sequence."""
    B, Tl, H, D = x.shape
    send = x.reshape(B, Tl, sp, H // sp, D).permute(2, 0, 1, 3, 4).contiguous()  # (sp, B, T/sp, H/sp, D)
    recv = torch.empty_like(send)
    comm.all_to_all_single(recv, send, group, "sp")  # recv[j]: rank j's tokens of my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(B, sp * Tl, H // sp, D)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup, sp: int) -> torch.Tensor:
    """(B, T, H/sp, D) -> (B, T/sp, H, D): scatter sequence, gather heads."""
    B, T, Hl, D = x.shape
    send = x.reshape(B, sp, T // sp, Hl, D).permute(1, 0, 2, 3, 4).contiguous()  # (sp, B, T/sp, H/sp, D)
    recv = torch.empty_like(send)
    comm.all_to_all_single(recv, send, group, "sp")  # recv[j]: my tokens of rank j's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(B, T // sp, sp * Hl, D)


class SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, sp: int) -> torch.Tensor:
        ctx.group, ctx.sp = group, sp
        return seq_to_heads(x, group, sp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return heads_to_seq(grad.contiguous(), ctx.group, ctx.sp), None, None


class HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, sp: int) -> torch.Tensor:
        ctx.group, ctx.sp = group, sp
        return heads_to_seq(x, group, sp)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return seq_to_heads(grad.contiguous(), ctx.group, ctx.sp), None, None
