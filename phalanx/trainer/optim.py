"""AdamW and the warmup + decay learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

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
            by_kind.setdefault((decays(param), mesh), []).append(param)
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


def decays(param: torch.Tensor) -> bool:
    """Whether AdamW decays `param`: matrices do, norm gains do not."""
    return param.dim() >= 2


def param_kinds(model: nn.Module) -> dict[bool, list[str]]:
    """The parameter names of the whole model (any module built on the meta device, before parallelisation),
    decayed or not, in model order: the param groups of one process, whatever layout trains it."""
    kinds: dict[bool, list[str]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            kinds.setdefault(decays(param), []).append(name)
    return kinds


def global_param_groups(local: list[dict[str, Any]], kinds: dict[bool, list[str]], weight_decay: float,
                        with_params: bool = True) -> list[dict[str, Any]]:
    """An optimizer's param groups as one process has them: one per kind, naming all of the model's
    parameters. A rank's own groups differ by layout (a pipeline stage names its parameters only, ep-sharded
    experts have groups of their own), so state saves these; torch's `set_state_dict` maps them back onto
    any rank's groups by name. Every hyperparameter but weight decay is the same in every group."""
    hyper = {k: v for k, v in local[0].items() if k not in ("params", "weight_decay")}
    return [{**hyper, "weight_decay": weight_decay if decayed else 0.0,
             **({"params": list(names)} if with_params else {})} for decayed, names in kinds.items()]


def schedule_state(schedule: LambdaLR) -> dict[str, Any]:
    """The LR schedule's state with its per-group lists as one value: every group has the same schedule, and
    the number of groups is the layout's (`global_param_groups`)."""
    state = schedule.state_dict()
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        if state.get(key):
            state[key] = state[key][:1]
    return state


def load_schedule_state(schedule: LambdaLR, state: dict[str, Any]) -> None:
    groups = len(schedule.optimizer.param_groups)
    state = {**state, **{key: list(state[key][:1]) * groups for key in ("base_lrs", "_last_lr", "lr_lambdas")
                        if state.get(key)}}
    schedule.load_state_dict(state)


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
