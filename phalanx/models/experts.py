"""Expert matmuls: E SwiGLU experts over rows sorted by expert, as grouped matmuls (GPU) or a loop (CPU)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


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
