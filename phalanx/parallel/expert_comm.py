"""The wire of expert parallelism: an all-to-all of token rows with uneven splits, and its autograd.

Forward sends each ep rank the rows routed to its experts; backward sends the gradients of the
received rows back along the same splits, reversed. Every call is counted (bytes, seconds) on the
`A2ACounter` it is given, so the MoE metrics report all-to-all traffic whether or not
`parallel.comm_stats` is on.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from phalanx.models.moe import A2ACounter
from phalanx.parallel.mesh import EXPERT_DIM
from phalanx.telemetry import comm


def exchange_rows(x: torch.Tensor, group: dist.ProcessGroup, out_splits: list[int], in_splits: list[int],
                  counter: A2ACounter) -> torch.Tensor:
    """Rows of `x` (split by `in_splits` over the ranks of `group`) -> the rows the others sent us."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    start = time.perf_counter()
    comm.all_to_all_single(out, x.contiguous(), group, EXPERT_DIM, out_splits, in_splits)
    counter.bytes += x.numel() * x.element_size()
    counter.seconds += time.perf_counter() - start
    return out


class AllToAllRows(torch.autograd.Function):
    """`exchange_rows` with autograd: the backward is the exchange with the splits swapped."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup, out_splits: list[int], in_splits: list[int],
                counter: A2ACounter) -> torch.Tensor:
        ctx.group, ctx.out_splits, ctx.in_splits, ctx.counter = group, out_splits, in_splits, counter
        return exchange_rows(x, group, out_splits, in_splits, counter)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return exchange_rows(grad, ctx.group, ctx.in_splits, ctx.out_splits, ctx.counter), None, None, None, None


def exchange_counts(send: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """(ep * local_experts,) rows this rank sends to each expert -> (ep, local_experts) rows each rank sends us."""
    recv = torch.empty_like(send)
    comm.all_to_all_single(recv, send, group, EXPERT_DIM)
    return recv.view(dist.get_world_size(group), -1)
