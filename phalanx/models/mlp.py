"""The SwiGLU MLP of a dense block, and of each expert and the shared expert of an MoE block."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from phalanx.config import ModelConfig


def ffn_dim(cfg: ModelConfig) -> int:
    """SwiGLU hidden size: 8/3 * d_model (same FLOPs as a 4*d GELU MLP), rounded up to multiple_of."""
    if cfg.ffn_dim is not None:
        return cfg.ffn_dim
    hidden = int(8 * cfg.d_model / 3)
    return cfg.multiple_of * math.ceil(hidden / cfg.multiple_of)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
