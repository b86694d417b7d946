"""The mixture-of-experts MLP: a router, E SwiGLU experts stored as stacked weights, an optional shared expert.

Replaces `Block.mlp` in every `model.moe.every_n_layers`-th block. Routing and capacity live in
`routing.py`, the expert matmuls in `experts.py`; this module owns the parameters, the combine of the
experts' rows and the per-step statistics. Expert parallelism swaps in its all-to-all dispatch
(`phalanx/parallel/expert.py`) for `LocalDispatch`.
Parameter names: `router.weight` (E, d), `experts.w1` / `experts.w3` (E, d, F: gate / up), `experts.w2` (E, F, d),
`shared.w1/w3/w2` when a shared expert is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from phalanx.config import ModelConfig
from phalanx.models.experts import swiglu_experts
from phalanx.models.mlp import SwiGLU, ffn_dim
from phalanx.models.routing import AuxLossInjector, Routing, SequenceShards, route

ExpertFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rows sorted by local expert, counts) -> rows


@dataclass
class A2ACounter:
    """Bytes this rank sent and seconds spent in expert all-to-alls since the last `take()`."""

    bytes: int = 0
    seconds: float = 0.0

    def take(self) -> tuple[int, float]:
        out = (self.bytes, self.seconds)
        self.bytes, self.seconds = 0, 0.0
        return out


class LocalDispatch:
    """All experts on this rank: the sorted rows go straight to them."""

    def __init__(self) -> None:
        self.counter = A2ACounter()

    def __call__(self, rows: torch.Tensor, counts: torch.Tensor, experts: ExpertFn) -> torch.Tensor:
        return experts(rows, counts)


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


def expert_ffn_dim(cfg: ModelConfig) -> int:
    return cfg.moe.ffn_dim if cfg.moe.ffn_dim is not None else ffn_dim(cfg)


def is_moe_block(cfg: ModelConfig, index: int) -> bool:
    n = cfg.moe.every_n_layers
    return cfg.moe.num_experts > 0 and (index + 1) % n == 0


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights, so all experts run as one grouped matmul per projection."""

    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.kernel = "auto"

    def local(self) -> tuple[torch.Tensor, ...]:
        """This rank's experts' weights (the ep shard when sharded), with autograd."""
        from torch.distributed.tensor import DTensor

        return tuple(w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w3, self.w2))

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return swiglu_experts(rows, *self.local(), counts, self.kernel)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.moe
        self.router = nn.Linear(cfg.d_model, cfg.moe.num_experts, bias=False)
        self.experts = Experts(cfg.moe.num_experts, cfg.d_model, expert_ffn_dim(cfg))
        self.experts.kernel = cfg.moe.kernel
        self.shared = SwiGLU(cfg.d_model, ffn_dim(cfg)) if cfg.moe.shared_expert else None
        self.sequence = SequenceShards()  # set by the expert strategy under sequence parallelism
        self.dispatch: Any = LocalDispatch()  # AllToAllDispatch under expert parallelism
        self.loss_scale = 1.0  # gradient of the aux losses: 1 / micro-batches, set by the trainer
        self._stats: torch.Tensor | None = None  # (1 + 4 + E,): forwards, then the routing stats summed
        self.trace: list | None = None  # set to a list to record each forward's (experts, keep) (tests)

    def shard_experts(self, mesh: Any) -> None:
        """Make the stacked expert weights DTensors over the (edp, ep) mesh: Shard(0) over ep, replicated over edp."""
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        for name in ("w1", "w3", "w2"):
            weight = getattr(self.experts, name)
            setattr(self.experts, name, nn.Parameter(distribute_tensor(weight.data, mesh, [Replicate(), Shard(0)])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape  # (B, T, d), T/sp tokens of each sequence under sequence parallelism
        routing = route(x, self.router.weight, self.cfg, self.sequence)
        if self.trace is not None:
            keep = routing.keep if routing.keep is not None else torch.ones_like(routing.experts, dtype=torch.bool)
            self.trace.append((routing.experts.view(B, T, -1).detach(), keep.view(B, T, -1).detach()))
        out = moe_combine(x.reshape(B * T, d), routing, self.cfg.num_experts, self.dispatch, self.experts)
        out = out.view(B, T, d)
        if self.shared is not None:
            out = out + self.shared(x)
        if self.training:
            self._accumulate(routing.stats)
            if torch.is_grad_enabled():
                loss = self.cfg.aux_loss_coef * routing.aux_loss + self.cfg.z_loss_coef * routing.z_loss
                out = AuxLossInjector.apply(out, loss, self.loss_scale)
        return out

    def _accumulate(self, stats: torch.Tensor) -> None:
        stats = torch.cat([stats.new_ones(1), stats.to(torch.float64)])
        self._stats = stats if self._stats is None else self._stats + stats

    def take_stats(self) -> torch.Tensor:
        """Routing statistics summed since the last call (forwards first), and reset."""
        stats = self._stats
        self._stats = None
        if stats is None:
            return torch.zeros(5 + self.cfg.num_experts, dtype=torch.float64, device=self.router.weight.device)
        return stats
