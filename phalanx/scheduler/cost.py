"""The cost model: memory per device and step time of a layout on a topology.

Memory = parameters + gradients + optimizer state (AdamW: two fp32 moments), each as the data-parallel
back end shards it, + activations of the micro-batches in flight (1 without pp; up to pp - stage for
1F1B, all of a run's for GPipe). Parameter, gradient and optimizer bytes are exact for ddp, fsdp and
ep (tested against what each rank holds); activations are an estimate of what autograd keeps.

Step time = compute (the rank's FLOPs over achieved FLOP/s, / (1 - bubble) under pp — less where
ranks share CPU cores and the busy ones speed up in the bubble (`idle_speedup`), 4/3 of the block
compute with activation checkpointing) + exposed communication (alpha-beta per collective,
`placement.collective_time`: sp/ep all-to-alls and pipeline sends are on the critical path; DDP and
FSDP traffic hides behind up to `overlap` x backward compute) + the optimizer step (memory-bound) +
a fixed per-step overhead (calibrated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from phalanx.scheduler.layout import Layout
from phalanx.scheduler.placement import LOGICAL, comm_times, critical_ranks
from phalanx.scheduler.shapes import ModelShapes, model_shapes
from phalanx.scheduler.topology import Topology
from phalanx.scheduler.traffic import _data_parallel_shapes, _padded, rank_stages, step_traffic

OPTIMIZER_TOUCH = 32  # bytes AdamW reads and writes per fp32 parameter: p, g, m, v in; p, m, v out; + the norm
OVERLAPPED = ("dp_sp", "edp")  # gradient / parameter traffic the back ends overlap with compute


@dataclass
class Memory:
    params: float
    grads: float
    optim: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optim + self.activations


def state_memory(cfg: Any, layout: Layout, pp_rank: int = 0) -> Memory:
    """Parameter, gradient and optimizer bytes on one rank (activations 0; see `memory`)."""
    shapes = model_shapes(cfg.model)
    n = layout.dp * layout.sp
    dense, experts = 0.0, 0.0
    for stage in rank_stages(cfg, layout, pp_rank):
        groups = _data_parallel_shapes(shapes, stage, layout.ep)
        if layout.dp_backend == "fsdp" and n > 1:
            dense += sum(sum(_padded(s, n) for s in g) / n for g in groups)
        else:
            dense += sum(shapes.numel(g) for g in groups)
        if layout.ep > 1:
            experts += sum(shapes.numel(shapes.blocks[i].experts) / layout.ep for i in stage.blocks)
    params = (dense + experts) * 4
    grads, optim = params, 2 * params
    if layout.dp_backend == "zero" and n > 1:  # DeepSpeed partitions flat: optimizer, + grads, + params
        optim /= n
        if layout.zero_stage >= 2:
            grads /= n
        if layout.zero_stage == 3:
            params /= n
    return Memory(params, grads, optim, 0.0)


def activation_bytes(cfg: Any, layout: Layout, pp_rank: int = 0) -> float:
    """What autograd keeps for one micro-batch on this rank's stages (an estimate, per token per block:
    residual and norm inputs in fp32, q/k/v/attention out, the SwiGLU hidden tensors; logits on the last)."""
    m, moe = cfg.model, cfg.model.moe
    from phalanx.models.gpt import ffn_dim
    from phalanx.models.moe import expert_ffn_dim

    a = 2 if cfg.train.dtype == "bf16" else 4
    d, F = m.d_model, ffn_dim(m)
    kv = (m.n_kv_heads or m.n_heads) * (d // m.n_heads)
    tokens = layout.micro_batch_size * cfg.data.seq_len // layout.sp
    shapes = model_shapes(m)
    total = 0.0
    for stage in rank_stages(cfg, layout, pp_rank):
        for i in stage.blocks:
            attention = 2 * 4 * d + a * (2 * d + 2 * kv) + a * (d + kv) + a * d  # residuals, norm, qkv, rope, out
            if shapes.blocks[i].is_moe:
                mlp = moe.top_k * (4 * d + 4 * a * expert_ffn_dim(m)) + 4 * moe.num_experts * 3
            else:
                mlp = a * d + 4 * a * F
            per_token = 4 * d if layout.activation_checkpointing else attention + mlp
            total += per_token * tokens
        if layout.activation_checkpointing and stage.blocks:  # one block's whole activations while recomputing
            total += (2 * 4 * d + 5 * a * d + 4 * a * F) * tokens
        if stage.last:
            total += tokens * m.vocab_size * (a + 4 + 4)  # logits, fp32 copy and its gradient in the loss
    return total


def in_flight(layout: Layout, batch_size: int, pp_rank: int) -> float:
    """Micro-batches whose activations a rank holds at its peak."""
    if layout.pp == 1:
        return 1
    m = layout.pipeline_microbatches(batch_size)
    if layout.pp_schedule == "gpipe":
        return m
    # 1F1B warms up pp - stage micro-batches; interleaving keeps about v times as many chunks of 1/v size each
    return min(m * layout.virtual, layout.pp - pp_rank + (layout.virtual - 1) * layout.pp) / layout.virtual


def memory(cfg: Any, layout: Layout, pp_rank: int = 0) -> Memory:
    mem = state_memory(cfg, layout, pp_rank)
    mem.activations = activation_bytes(cfg, layout, pp_rank) * in_flight(layout, cfg.train.batch_size, pp_rank)
    return mem


def stage_flops_per_token(cfg: Any, shapes: ModelShapes, layout: Layout, pp_rank: int) -> tuple[float, float]:
    """(block FLOPs, head FLOPs) per token of training on this rank's stages: 6 x active matmul weights +
    attention (12 L d T), as `phalanx.models.gpt.flops_per_token` counts the whole model."""
    from phalanx.models.gpt import flops_per_token

    m = cfg.model
    whole = flops_per_token(m, cfg.data.seq_len)
    head = 6.0 * m.d_model * m.vocab_size
    per_block = (whole - head) / len(shapes.blocks)  # blocks of one model cost alike (MoE: active experts)
    stages = rank_stages(cfg, layout, pp_rank)
    return per_block * sum(len(s.blocks) for s in stages), head * any(s.last for s in stages)


@dataclass
class StepCost:
    layout: Layout
    memory: Memory  # the fullest rank's
    fits: bool
    compute_s: float
    comm_s: dict[str, float]  # exposed seconds per "kind/dim"
    bubble: float
    optimizer_s: float
    overhead_s: float
    step_s: float
    tokens_per_s: float
    mfu: float
    bytes_per_dim: dict[str, int] = field(default_factory=dict)
    order: tuple[str, ...] = LOGICAL


def step_cost(cfg: Any, layout: Layout, topo: Topology, order: Optional[tuple[str, ...]] = None) -> StepCost:
    """Predicted memory and step time of `layout` (rank order `order`, default phalanx's) on `topo`."""
    from phalanx.models.gpt import flops_per_token

    order = order or LOGICAL
    shapes = model_shapes(cfg.model)
    A = layout.accumulation(cfg.train.batch_size)
    tokens_rank = A * layout.micro_batch_size * cfg.data.seq_len / layout.sp  # tokens this rank computes
    rate = topo.peak_flops * topo.achieved
    ranks = critical_ranks(layout)
    traffic = {r: step_traffic(cfg, layout, r) for r in ranks}
    times = comm_times(cfg, layout, topo, order, traffic)

    worst_compute, worst_mem, optimizer_s = 0.0, None, 0.0
    for r in ranks:
        blocks, head = stage_flops_per_token(cfg, shapes, layout, r)
        if layout.activation_checkpointing:
            blocks *= 4 / 3  # one more forward of every block in backward
        share = sum(len(s.blocks) for s in rank_stages(cfg, layout, r)) / len(shapes.blocks)
        fixed = A * topo.microbatch_overhead_s * share  # per micro-batch, for this rank's share of the model
        worst_compute = max(worst_compute, tokens_rank * (blocks + head) / rate + fixed)
        mem = memory(cfg, layout, r)
        if worst_mem is None or mem.total > worst_mem.total:
            worst_mem = mem
        # AdamW updates the parameters whose moments this rank holds (a shard under fsdp and zero)
        optimizer_s = max(optimizer_s, mem.optim / 8 * OPTIMIZER_TOUCH / topo.optimizer_bytes_per_s)
    bubble = 0.0
    compute_s = worst_compute
    if layout.pp > 1:
        from phalanx.scheduler.pipeline import theoretical_bubble

        bubble = theoretical_bubble(layout.pp, layout.pipeline_microbatches(cfg.train.batch_size), layout.virtual)
        # the idle share of the step; ranks that share cores (idle_speedup > 1) work faster through it
        compute_s = worst_compute * (1 + bubble / (1 - bubble) / topo.idle_speedup)
    hideable = topo.overlap * worst_compute * 2 / 3  # backward's share of the compute
    exposed: dict[str, float] = {}
    for key, t in sorted(times.items(), key=lambda kv: kv[0]):
        if key.split("/")[1] in OVERLAPPED:
            hidden = min(t, hideable)
            hideable -= hidden
            t -= hidden
        exposed[key] = t
    step_s = compute_s + sum(exposed.values()) + optimizer_s + topo.step_overhead_s
    tokens_per_s = cfg.train.batch_size * cfg.data.seq_len / step_s
    mfu = flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_s / layout.world / topo.peak_flops
    assert worst_mem is not None
    per_dim: dict[str, int] = {}
    for flows in traffic.values():
        mine: dict[str, int] = {}
        for key, flow in flows.items():
            dim = key.split("/")[1]
            mine[dim] = mine.get(dim, 0) + flow.bytes
        per_dim = {d: max(per_dim.get(d, 0), mine.get(d, 0)) for d in {*per_dim, *mine}}
    return StepCost(layout, worst_mem, worst_mem.total <= 0.9 * topo.memory_bytes, compute_s, exposed, bubble,
                    optimizer_s, topo.step_overhead_s, step_s, tokens_per_s, mfu, per_dim, order)
