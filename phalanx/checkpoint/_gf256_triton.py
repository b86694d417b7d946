"""GF(2^8) multiply-accumulate on CUDA tensors: one Triton kernel for all outputs of a `gf_dot` call.

Each program reads a tile of every source once, looks each byte up in the 256x256 product table (64 KiB:
it stays in L1/L2) per output, XORs, and writes each output once, so one call moves (k + m) bytes per
byte of a block, where the torch path moves ~20. The k sources (and m outputs) are separate allocations:
the kernel gets the first one's pointer and every one's byte offset from it.

Imported only for CUDA tensors (`gf256.triton_dot`); importing it needs Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _gf_dot_kernel(out_base, out_offsets, src_base, src_offsets, coefs, table, n,
                   K: tl.constexpr, M: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    for r in tl.static_range(M):
        out = out_base + tl.load(out_offsets + r) + idx
        if ACCUMULATE:
            acc = tl.load(out, mask=mask, other=0).to(tl.int32)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.int32)
        for j in tl.static_range(K):
            x = tl.load(src_base + tl.load(src_offsets + j) + idx, mask=mask, other=0).to(tl.int32)
            c = tl.load(coefs + r * K + j)
            acc ^= tl.load(table + c * 256 + x, mask=mask, other=0).to(tl.int32)
        tl.store(out, acc.to(tl.uint8), mask=mask)


def _offsets(tensors: list[torch.Tensor]) -> torch.Tensor:
    base = tensors[0].data_ptr()
    return torch.tensor([t.data_ptr() - base for t in tensors], dtype=torch.int64, device=tensors[0].device)


def gf_dot_cuda(outs: list[torch.Tensor], srcs: list[torch.Tensor], coefs: list[list[int]], table: torch.Tensor,
                accumulate: bool) -> None:
    """`gf256.gf_dot` for contiguous 1-D uint8 CUDA tensors of one length (outs must not overlap srcs)."""
    n, device = srcs[0].numel(), srcs[0].device
    flat = torch.tensor([c for row in coefs for c in row], dtype=torch.int32, device=device)
    grid = (triton.cdiv(n, BLOCK),)
    _gf_dot_kernel[grid](outs[0], _offsets(outs), srcs[0], _offsets(srcs), flat, table, n,
                         K=len(srcs), M=len(outs), ACCUMULATE=bool(accumulate), BLOCK=BLOCK)
