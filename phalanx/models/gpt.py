"""A Llama-style GPT, readable top to bottom: RMSNorm, RoPE, MHA/GQA attention, SwiGLU MLP.

Built on the meta device and materialised after parallelisation (`materialize`). Two seams
for the parallel strategies:
  * `Attention.core` computes attention from (q, k, v); Ulysses sequence parallelism wraps it
    in all-to-alls without touching the projections.
  * `Block.mlp` is any module mapping (B, T, d) -> (B, T, d): SwiGLU, or `moe.MoE` in every
    `model.moe.every_n_layers`-th block when `model.moe.num_experts` > 0.
Blocks live in `GPT.layers`, a ModuleDict keyed "0".."L-1": a pipeline stage deletes the
blocks it does not own and the remaining names (and so checkpoint keys) stay unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from phalanx.config import ACTIVATION_CHECKPOINTING, ModelConfig
from phalanx.models.hf import HFWeights
from phalanx.models.mlp import SwiGLU, ffn_dim
from phalanx.models.moe import MoE, expert_ffn_dim, is_moe_block


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability under bf16 autocast.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_seq_len, head_dim // 2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., 2i], x[..., 2i+1]); x: (B, T, nh, hs), cos/sin: (T, hs/2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, nh, hs/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class CoreAttention(nn.Module):
    """Causal attention of (B, T, nh, hs) queries over (B, T, nkv, hs) keys/values -> (B, T, nh, hs)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        groups = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
        return out.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.core = CoreAttention()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.core(q, k, v)  # (B, T, nh, hs)
        return self.wo(y.reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.recompute = False  # activation checkpointing (set_activation_checkpointing)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg) if is_moe_block(cfg, index) else SwiGLU(cfg.d_model, ffn_dim(cfg))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            # keeps only the block's input; backward runs the forward again (its collectives too, on every rank
            # alike). Inside the block's own call: FSDP's and DeepSpeed's hooks around it stay where they were.
            return checkpoint(self._forward, x, cos, sin, use_reentrant=False)
        return self._forward(x, cos, sin)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


def set_activation_checkpointing(model: nn.Module, mode: str) -> int:
    """Which blocks recompute their forward in backward (`train.activation_checkpointing`): none; full, every
    block; selective, every other block (1, 3, 5, ...: torchtitan's selective per-layer checkpointing at
    frequency 2, about half the activation memory saved for about half the recompute). Parameter names and
    state are unchanged (no wrapper module), so checkpoints move freely between modes. Returns the blocks set."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation checkpointing {mode!r}: one of {ACTIVATION_CHECKPOINTING}")
    count = 0
    for module in model.modules():
        if isinstance(module, Block):
            module.recompute = mode == "full" or (mode == "selective" and module.index % 2 == 1)
            count += module.recompute
    return count


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # RoPE tables are derived, not state: computed in materialize(), never checkpointed.
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.d_model // cfg.n_heads // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.d_model // cfg.n_heads // 2), persistent=False)
        # Every parameter of the whole model, in init order: a pipeline stage that keeps some of them
        # still draws all of them, so each stage holds exactly the values one process would.
        self.init_order = [(name, tuple(p.shape)) for name, p in self.named_parameters()]
        self.positions: Optional[torch.Tensor] = None  # default RoPE positions (a sequence shard's, under sp)

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab). `positions` (T,) overrides 0..T-1 (sequence shards)."""
        cos, sin = self.rope(tokens.shape[1], positions)
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens  # (B, T, d)
        for block in self.layers.values():
            h = block(h, cos, sin)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    def rope(self, T: int, positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for T tokens at `positions` (else `self.positions`, else 0..T-1)."""
        positions = positions if positions is not None else self.positions
        if positions is None:
            return self.rope_cos[:T], self.rope_sin[:T]
        return self.rope_cos[positions], self.rope_sin[positions]

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, weights: Optional[HFWeights] = None) -> None:
        """Deterministic init from `generator`, in parameter-name order, whatever the device; or, given
        `weights` (model.init_from), each parameter's own region read from a Hugging Face model's files.

        Values are drawn on the CPU and copied, so one seed gives the same model on CPU and GPU.
        Output projections are scaled by 1/sqrt(2 * n_layers) (GPT-2) to keep the residual stream stable.
        """
        if self.cfg.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight  # to_empty() off the meta device unties them
        params = dict(self.named_parameters())
        if weights is not None:
            weights.fill(params, self.cfg)
        else:
            self._draw(generator, params)
        cos, sin = rope_tables(self.cfg.d_model // self.cfg.n_heads, self.cfg.max_seq_len, self.cfg.rope_theta,
                               self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def _draw(self, generator: torch.Generator, params: dict[str, torch.Tensor]) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, shape in self.init_order:
            if name.endswith("norm.weight"):
                full = torch.ones(shape)
            else:
                scale = out_std if name.endswith(("wo.weight", "w2.weight", "experts.w2")) else std
                full = torch.empty(shape, dtype=torch.float32).normal_(0.0, scale, generator=generator)
            if name in params:  # a pipeline stage draws the other stages' values too, and drops them
                _assign(params[name], full)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _assign(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full CPU tensor `full` into `param`, which may be a shard (DTensor) of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(param.device, param.dtype)
    if isinstance(param, DTensor):
        # Every rank drew the same full tensor from the same seed: each keeps its own shard.
        full = distribute_tensor(full, param.device_mesh, param.placements)
    param.copy_(full)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 * N + 12 * L * d * T (PaLM appendix B).

    N counts the weights that do matmuls (embedding lookup excluded, output head included);
    the second term is attention's score and value matmuls over a causal context of `seq_len`.
    """
    d, L = cfg.d_model, cfg.n_layers
    hd = d // cfg.n_heads
    kv = (cfg.n_kv_heads or cfg.n_heads) * hd
    attention = d * d * 2 + d * kv * 2  # wq, wo, wk, wv
    dense = 3 * d * ffn_dim(cfg)  # w1, w2, w3
    moe = cfg.moe
    # An MoE block's active weights: the router, top_k experts and the shared expert.
    sparse = d * moe.num_experts + moe.top_k * 3 * d * expert_ffn_dim(cfg) + (dense if moe.shared_expert else 0)
    n_moe = sum(is_moe_block(cfg, i) for i in range(L))
    n_matmul = L * attention + (L - n_moe) * dense + n_moe * sparse + d * cfg.vocab_size
    return 6.0 * n_matmul + 12.0 * L * d * seq_len
