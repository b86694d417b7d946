"""AdamW and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from phalanx.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are not decayed).

    Parameters on different device meshes (ep-sharded experts beside dense weights) go into separate
    groups: one foreach/fused kernel cannot mix plain tensors and DTensors of other meshes.
    """
    from torch.distributed.tensor import DTensor

    by_kind: dict[tuple, list[torch.Tensor]] = {}  # (decayed, mesh) -> parameters, in model order
    for param in model.parameters():
        if param.requires_grad:
            mesh = param.device_mesh.mesh_dim_names if isinstance(param, DTensor) else None
            by_kind.setdefault((param.dim() >= 2, mesh), []).append(param)
    groups = [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0}
              for (decay, _), params in by_kind.items()]
    impl = cfg.implementation
    if impl == "auto":
        # The fused kernel exists for CUDA (and recent CPU builds); foreach is the portable fast path.
        impl = "fused" if device.type == "cuda" else "foreach"
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        fused=impl == "fused", foreach=impl == "foreach" if impl != "fused" else None,
    )


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of `cfg.lr` for optimizer step `step` (0-based): linear warmup, then decay to min_lr_ratio."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        shape = 1.0 - progress
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
