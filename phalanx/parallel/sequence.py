"""Ulysses sequence parallelism (DeepSpeed-Ulysses, arXiv:2309.14509).

Each sp rank holds T/sp tokens of every sample. Around the attention kernel, an all-to-all
trades sequence sharding for head sharding, so the kernel sees the whole sequence for H/sp heads;
a second all-to-all trades back. Per rank and layer the bytes moved are proportional to T/sp, so
they stay constant when sequence length and sp grow together. Everything outside attention is
token-local; its gradients are summed over sp by the data-parallel back end, which reduces over
the flattened (dp, sp) group.

Beyond DeepSpeed: with GQA/MQA, key/value heads fewer than sp (or not divisible by it) are
replicated just enough for every rank to hold the kv heads its query heads use, instead of refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from phalanx.errors import ConfigError
from phalanx.parallel.registry import register
from phalanx.parallel.sequence_comm import HeadsToSeq, SeqToHeads


def kv_repeat(n_heads: int, n_kv_heads: int, sp: int) -> int:
    """Copies of each kv head so that head-sharding over sp gives every rank its query heads' kv heads."""
    if n_kv_heads % sp == 0:
        return 1  # kv heads split evenly and line up with the query-head groups
    if sp % n_kv_heads == 0:
        return sp // n_kv_heads  # each rank's query heads fall in one kv group: one kv head per rank
    return n_heads // n_kv_heads  # otherwise expand to full multi-head attention


def all_to_all_bytes(model_cfg: Any, sp: int, batch: int, seq_len: int, element_size: int = 4) -> int:
    """Bytes one rank sends in the all-to-alls of one layer's forward and backward, for `batch` sequences.

    Forward: q, k, v packed (kv heads after replication) to head sharding, the output back;
    backward: their gradients the other way. Each is (batch, seq_len/sp, heads, head_dim).
    """
    heads, kv = model_cfg.n_heads, model_cfg.n_kv_heads or model_cfg.n_heads
    kv_heads = kv * kv_repeat(heads, kv, sp)
    head_dim = model_cfg.d_model // heads
    per_pass = batch * (seq_len // sp) * head_dim * (2 * heads + 2 * kv_heads) * element_size
    return 2 * per_pass


class UlyssesAttention(nn.Module):
    """Wraps a core attention (q, k, v sharded by sequence) in the two all-to-alls."""

    def __init__(self, inner: nn.Module, group: Any, sp: int, repeat: int):
        super().__init__()
        self.inner, self.group, self.sp, self.repeat = inner, group, sp, repeat

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (B, T/sp, nh, hs); k, v: (B, T/sp, nkv, hs)
        if self.repeat > 1:
            k, v = k.repeat_interleave(self.repeat, dim=2), v.repeat_interleave(self.repeat, dim=2)
        # One all-to-all carries q, k and v (DeepSpeed issues three).
        q, k, v = SeqToHeads.apply(self.group, self.sp, q, k, v)  # (B, T, heads/sp, hs)
        out = self.inner(q, k, v)  # (B, T, nh/sp, hs)
        return HeadsToSeq.apply(self.group, self.sp, out)  # (B, T/sp, nh, hs)


@register("sequence", "ulysses")
class UlyssesStrategy:
    on_meta = True

    @staticmethod
    def validate(layout: Any, cfg: Any) -> None:
        sp, m, seq = layout.sp, cfg.model, cfg.data.seq_len
        if sp == 1:
            return
        if seq % sp:
            raise ConfigError(
                f"data.seq_len({seq}) is not divisible by parallel.sp({sp}); each sp rank holds seq_len/sp tokens: "
                f"set data.seq_len to a multiple of {sp}"
            )
        if m.n_heads % sp:
            divisors = [d for d in range(1, m.n_heads + 1) if m.n_heads % d == 0]
            raise ConfigError(
                f"model.n_heads({m.n_heads}) is not divisible by parallel.sp({sp}); Ulysses gives each sp rank "
                f"n_heads/sp heads: choose sp in {divisors} or n_heads a multiple of {sp}"
            )

    @staticmethod
    def apply(model: nn.Module, mesh: Any, cfg: Any) -> nn.Module:
        sp = mesh["sp"].size()
        if sp == 1:
            return model
        group = mesh["sp"].get_group()
        repeat = kv_repeat(cfg.model.n_heads, cfg.model.n_kv_heads or cfg.model.n_heads, sp)
        for block in model.layers.values():
            block.attn.core = UlyssesAttention(block.attn.core, group, sp, repeat)
        return model

    @staticmethod
    def shard_batch(batch: torch.Tensor, mesh: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T+1) tokens -> this rank's (inputs, targets, positions), each T/sp long."""
        sp, rank = mesh["sp"].size(), mesh.get_local_rank("sp")
        inputs, targets = batch[:, :-1], batch[:, 1:]
        chunk = inputs.shape[1] // sp
        lo, hi = rank * chunk, (rank + 1) * chunk
        positions = torch.arange(lo, hi, device=batch.device)
        return inputs[:, lo:hi], targets[:, lo:hi], positions
