"""The cost model: memory per device and step time of a layout on a topology.

Memory = parameters + gradients + optimizer state (AdamW: two fp32 moments), each as the data-parallel
back end shards it, + activations of the micro-batches in flight (1 without pp; up to pp - stage for
1F1B, all of a run's for GPipe). Parameter, gradient and optimizer bytes are exact for ddp, fsdp and
ep (tested against what each rank holds); activations are an estimate of what autograd keeps.

Step time = compute (the rank's FLOPs over achieved FLOP/s plus a fixed cost per micro-batch, 4/3 of the
block compute with activation checkpointing; slower by `contention.slowdown` while ranks sharing CPU cores
compute at once; under pp the schedule's slots, `contention.pipeline_time`, so the bubble costs m * work *
bubble / (1 - bubble) on devices of their own and less where the ramps free shared cores) + exposed
communication (alpha-beta per collective, `placement.collective_time`: sp/ep all-to-alls and pipeline sends
are on the critical path; DDP and FSDP traffic hides behind up to `overlap` x backward compute) + the copies
around them (Ulysses' pack / unpack, FSDP2's copy-in / copy-out), FSDP2's fixed cost per all-gather /
reduce-scatter and the wait of every sp / ep collective for the slowest rank + the optimizer step (memory-bound; plus a per-parameter cost for FSDP's DTensor shards) + a
fixed per-step overhead. Every CPU term is calibrated by `phalanx plan --calibrate`'s micro-benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from phalanx.parallel.layout import Layout
from phalanx.planner.contention import pipeline_time, slowdown
from phalanx.planner.placement import comm_times, critical_ranks
from phalanx.planner.shapes import ModelShapes, model_shapes
from phalanx.planner.topology import Topology
from phalanx.planner.traffic import _data_parallel_shapes, _padded, rank_stages, step_traffic

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
    from phalanx.models.mlp import ffn_dim
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


def sharded_tensors(cfg: Any, layout: Layout, pp_rank: int = 0) -> int:
    """Parameter tensors FSDP2 turns into DTensor shards on this rank (0 under other back ends)."""
    if layout.dp_backend != "fsdp" or layout.dp * layout.sp == 1:
        return 0
    shapes = model_shapes(cfg.model)
    return sum(len(g) for s in rank_stages(cfg, layout, pp_rank) for g in _data_parallel_shapes(shapes, s, layout.ep))


def cpu_comm_costs(traffic: dict[int, dict], layout: Layout, topo: Topology) -> dict[str, float]:
    """Seconds per step of the work around collectives that is neither wire time nor FLOPs, on the most loaded
    rank: Ulysses packs every all-to-all's send buffer and unpacks its receive buffer (two strided copies of its
    bytes, q/k/v as separate copies in and out); FSDP2 copies each all-gather's output out of the flat buffer and
    each reduce-scatter's input in, and pays a fixed cost per call (hooks, stream and buffer bookkeeping)."""
    out: dict[str, float] = {}
    n = layout.dp * layout.sp
    for flows in traffic.values():
        mine: dict[str, float] = {}
        a2a = flows.get("all_to_all/sp")
        if a2a is not None and a2a.calls:
            # forward and backward: q, k, v packed in and copied out (3 + 3 copies), the output (1 + 1)
            mine["copies/sp"] = 2 * a2a.bytes / topo.copy.bandwidth + 4 * a2a.calls * topo.copy.latency_s
        # every collective inside forward / backward waits for the slowest rank of its group
        inside = sum(f.calls or 0 for key, f in flows.items() if key.split("/")[1] in ("sp", "ep"))
        if inside and topo.sync_s:
            mine["sync/sp_ep"] = inside * topo.sync_s
        if layout.dp_backend == "fsdp" and n > 1:
            gather, scatter = flows.get("all_gather/dp_sp"), flows.get("reduce_scatter/dp_sp")
            calls = sum(f.calls or 0 for f in (gather, scatter) if f is not None)
            nbytes = (gather.bytes * n if gather else 0) + (scatter.bytes if scatter else 0)
            mine["fsdp/dp_sp"] = calls * (topo.fsdp_call_s + topo.copy.latency_s) + nbytes / topo.copy.bandwidth
        for key, t in mine.items():
            out[key] = max(out.get(key, 0.0), t)
    return out


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


def step_cost(cfg: Any, layout: Layout, topo: Topology) -> StepCost:
    """Predicted memory and step time of `layout` (with its rank order) on `topo`."""
    from phalanx.models.gpt import flops_per_token

    shapes = model_shapes(cfg.model)
    A = layout.accumulation(cfg.train.batch_size)
    tokens_rank = A * layout.micro_batch_size * cfg.data.seq_len / layout.sp  # tokens this rank computes
    rate = topo.peak_flops * topo.achieved
    ranks = critical_ranks(layout)
    traffic = {r: step_traffic(cfg, layout, r) for r in ranks}
    times = comm_times(cfg, layout, topo, traffic)

    worst_mb, worst_mem, optimizer_s = 0.0, None, 0.0
    for r in ranks:
        blocks, head = stage_flops_per_token(cfg, shapes, layout, r)
        if layout.activation_checkpointing:
            blocks *= 4 / 3  # one more forward of every block in backward
        share = sum(len(s.blocks) for s in rank_stages(cfg, layout, r)) / len(shapes.blocks)
        # one micro-batch's forward + backward on this rank, computing alone: FLOPs + the fixed cost of its share
        per_mb = tokens_rank / A * (blocks + head) / rate + topo.microbatch_overhead_s * share
        worst_mb = max(worst_mb, per_mb)
        mem = memory(cfg, layout, r)
        if worst_mem is None or mem.total > worst_mem.total:
            worst_mem = mem
        # AdamW updates the parameters whose moments this rank holds (a shard under fsdp and zero)
        optimizer_s = max(optimizer_s, mem.optim / 8 * OPTIMIZER_TOUCH / topo.optimizer_bytes_per_s
                          + sharded_tensors(cfg, layout, r) * topo.fsdp_param_s)
    node_ranks = min(layout.world, topo.gpus_per_node)  # the ranks that share one node's cores
    busy = A * worst_mb * slowdown(topo.contention, node_ranks)  # every rank computing at once
    bubble = 0.0
    compute_s = busy
    if layout.pp > 1:
        from phalanx.parallel.pipeline_schedule import theoretical_bubble

        m = layout.pipeline_microbatches(cfg.train.batch_size)
        bubble = theoretical_bubble(layout.pp, m, layout.virtual)
        compute_s = A // m * pipeline_time(worst_mb, layout.pp, m, layout.virtual, layout.dp * layout.sp,
                                           topo.contention, node_ranks)
    hideable = topo.overlap * busy * 2 / 3  # backward's share of the compute
    for key, t in cpu_comm_costs(traffic, layout, topo).items():
        times[key] = max(times.get(key, 0.0), t)
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
                    optimizer_s, topo.step_overhead_s, step_s, tokens_per_s, mfu, per_dim)
