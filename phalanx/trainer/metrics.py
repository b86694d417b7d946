"""Throughput, MFU and memory for the step line."""

from __future__ import annotations

import resource
from typing import Optional

import torch

# Dense peak TFLOP/s per device: (bf16, tf32). Vendor datasheets, SXM parts, no sparsity.
PEAK_TFLOPS = {
    "H200": (989.4, 494.7),
    "H100": (989.4, 494.7),
    "A100": (312.0, 156.0),
    "L40S": (362.1, 181.0),
    "L4": (121.0, 60.0),
    "A10": (125.0, 62.5),
    "V100": (125.0, 15.7),  # fp16 tensor cores; no tf32
    "RTX 4090": (165.2, 82.6),
}


def peak_flops(device: torch.device, dtype: str) -> Optional[float]:
    """Peak FLOP/s of this device for `dtype`, or None where unknown (every CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, tf32) in PEAK_TFLOPS.items():
        if key in name:
            return (bf16 if dtype == "bf16" else tf32) * 1e12
    return None


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: device allocations on CUDA, resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def format_step_line(m: dict) -> str:
    """`step | loss | tokens/s | tokens/s/device | MFU | memory` (picotron's line)."""
    mfu = f"{m['mfu'] * 100:.1f}%" if m.get("mfu") is not None else "n/a"
    return (
        f"step {m['step']:>6} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | grad {m['grad_norm']:.3f} | "
        f"tokens/s {m['tokens_per_s']:,.0f} | tokens/s/device {m['tokens_per_s_per_device']:,.0f} | "
        f"MFU {mfu} | memory {m['memory_gib']:.2f} GiB"
        + (f" | aux {m['moe_aux_loss']:.3f} | dropped {m['moe_dropped'] * 100:.1f}% | "
           f"imbalance {m['moe_imbalance']:.2f}" if "moe_aux_loss" in m else "")
    )
