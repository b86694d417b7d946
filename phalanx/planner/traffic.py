"""Bytes per collective kind and mesh dimension that one optimizer step sends, per rank, from shapes.

Keys and the byte convention are those of `phalanx/telemetry/comm.py` ("kind/dim"; each call's input
buffer), so a prediction can be compared with a measurement key by key. Each rule below restates
what a strategy does, with the file that does it:

  * ddp (`data_parallel.py`): one all-reduce of every dense fp32 gradient over dp x sp per step (the
    last micro-batch; DDP buckets them, so the call count is DDP's, not predicted). Under pp the same
    bytes go in one flat all-reduce after the schedule.
  * fsdp (FSDP2, `fully_shard` per block, then the root): per parameter group, an all-gather of the
    padded shards (dim 0 padded to a multiple of dp x sp) in the param dtype and a reduce-scatter of the
    padded fp32 gradients. Without pp every micro-batch gathers every group in forward and, in backward,
    the groups resharded after forward (all blocks but the last); gradients reduce on the last
    micro-batch. Under pp each stage is a root: per schedule run of m micro-batches, every group once
    plus m for each group resharded after forward (torch's stage keeps parameters between backwards).
  * Ulysses sp (`sequence.py`): four all-to-alls per block and micro-batch (q/k/v and output, forward
    and backward), `all_to_all_bytes`.
  * MoE (`expert.py`): with sp, an all-reduce of (B, 2E) fp32 routing statistics per MoE block forward
    (and an all-gather of (B, k, E) int64 slot counts under a capacity); with ep, an all-to-all of E
    int64 counts and four of routed rows (B * T/sp * k rows of d fp32 when dropless), and an all-reduce
    over edp of each local expert weight's gradient per step.
  * pp (`parallel/pipeline_schedule.py`): each stage sends its output activation (B, T/sp, d) fp32 per
    micro-batch unless last, and its input gradient unless first; one 4-byte all-reduce over pp
    (the global gradient norm).
  * zero (DeepSpeed) does not go through comm.py: `zero_traffic` models it, unmeasured.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

from phalanx.parallel import pipeline
from phalanx.parallel.layout import Layout
from phalanx.planner.shapes import ModelShapes, Shape, model_shapes


@dataclass
class Flow:
    """Per-step traffic of one (kind, dim): calls (None where the library decides, e.g. DDP buckets), bytes."""

    calls: Optional[int]
    bytes: int

    def add(self, calls: Optional[int], nbytes: int) -> None:
        self.calls = None if calls is None or self.calls is None else self.calls + calls
        self.bytes += nbytes


def _padded(shape: Shape, n: int) -> int:
    """numel of `shape` with dim 0 padded to a multiple of n (FSDP2's shard padding)."""
    rest = math.prod(shape[1:])
    return math.ceil(shape[0] / n) * n * rest


@lru_cache(maxsize=256)
def stage_blocks(shapes: ModelShapes, stages: int, pp_split: Optional[tuple[int, ...]]) -> tuple[range, ...]:
    """Block indices of every pipeline stage: `phalanx.parallel.pipeline.stage_blocks` on the same costs."""
    costs = [shapes.numel(b.dense + b.experts) for b in shapes.blocks]
    first = shapes.numel((shapes.embedding,))
    last = shapes.numel((shapes.head, shapes.norm))
    return tuple(pipeline.stage_blocks(stages, pp_split, costs, first, last))


@dataclass(frozen=True)
class StageParams:
    """The parameter groups of one pipeline stage (the whole model when pp = 1)."""

    index: int
    first: bool
    last: bool
    blocks: tuple[int, ...]


def rank_stages(cfg: Any, layout: Layout, pp_rank: int) -> list[StageParams]:
    """The stages the rank at pipeline coordinate `pp_rank` runs, as the trainer splits them."""
    shapes = model_shapes(cfg.model)
    if layout.pp == 1:
        return [StageParams(0, True, True, tuple(range(len(shapes.blocks))))]
    n = layout.pp * layout.virtual
    pp_split = cfg.parallel.pp_split  # a split for another number of stages leaves this layout balanced
    split = stage_blocks(shapes, n, tuple(pp_split) if pp_split is not None and len(pp_split) == n else None)
    return [StageParams(s, s == 0, s == n - 1, tuple(split[s])) for s in range(n)
            if pipeline.stage_rank(s, layout.pp) == pp_rank]


def _root_shapes(shapes: ModelShapes, stage: StageParams) -> tuple[Shape, ...]:
    return ((shapes.embedding,) if stage.first else ()) + ((shapes.norm, shapes.head) if stage.last else ())


def _data_parallel_shapes(shapes: ModelShapes, stage: StageParams, ep: int) -> list[tuple[Shape, ...]]:
    """Parameter groups data parallelism owns: each block (experts left to ep when ep > 1), then the root."""
    groups = []
    for i in stage.blocks:
        block = shapes.blocks[i]
        groups.append(block.dense + (block.experts if ep == 1 else ()))
    groups.append(_root_shapes(shapes, stage))
    return groups


def step_traffic(cfg: Any, layout: Layout, pp_rank: int = 0) -> dict[str, Flow]:
    """{"kind/dim": Flow} of one optimizer step on a rank at pipeline coordinate `pp_rank`."""
    shapes = model_shapes(cfg.model)
    m, moe = cfg.model, cfg.model.moe
    bf16 = cfg.train.dtype == "bf16"
    act = 2 if bf16 else 4  # q, k, v and attention outputs under autocast
    data = layout.dp * layout.sp
    B, T = layout.micro_batch_size, cfg.data.seq_len
    Tl = T // layout.sp
    A = layout.accumulation(cfg.train.batch_size)  # micro-batches per rank and step
    d = shapes.d_model
    out: dict[str, Flow] = defaultdict(lambda: Flow(0, 0))
    stages = rank_stages(cfg, layout, pp_rank)

    for stage in stages:
        for i in stage.blocks:
            block = shapes.blocks[i]
            if layout.sp > 1:
                from phalanx.parallel.sequence import all_to_all_bytes

                out["all_to_all/sp"].add(4 * A, A * all_to_all_bytes(m, layout.sp, B, T, act))
            if block.is_moe:
                E, k = moe.num_experts, moe.top_k
                if layout.sp > 1:
                    out["all_reduce/sp"].add(A, A * B * 2 * E * 4)
                    if moe.capacity_factor is not None:
                        out["all_gather/sp"].add(A, A * B * k * E * 8)
                if layout.ep > 1:
                    rows = B * Tl * k  # dropless: every assignment travels (an upper bound under a capacity)
                    out["all_to_all/ep"].add(A, A * E * 8)
                    out["all_to_all/ep"].add(4 * A, 4 * A * rows * d * 4)
                    if data // layout.ep > 1:
                        out["all_reduce/edp"].add(len(block.experts),
                                                  sum(math.prod(s) // layout.ep for s in block.experts) * 4)

    if layout.pp > 1:
        act_bytes = B * Tl * d * 4  # the residual stream stays fp32 under autocast
        sends = sum((not s.last) + (not s.first) for s in stages) * A
        out["send/pp"].add(sends, sends * act_bytes)
        out["all_reduce/pp"].add(1, 4)

    if data > 1 and layout.dp_backend == "ddp":
        grads = sum(shapes.numel(g) for s in stages for g in _data_parallel_shapes(shapes, s, layout.ep))
        out["all_reduce/dp_sp"].add(1 if layout.pp > 1 else None, grads * 4)
    elif data > 1 and layout.dp_backend == "fsdp":
        p_elt = 2 if bf16 else 4
        runs = A // layout.pipeline_microbatches(cfg.train.batch_size) if layout.pp > 1 else A
        per_run = layout.pipeline_microbatches(cfg.train.batch_size) if layout.pp > 1 else 1
        for stage in stages:
            groups = [g for g in _data_parallel_shapes(shapes, stage, layout.ep) if g]
            resharded = max(0, len(stage.blocks) - 1)  # every block but the stage's last
            gather_bytes = [sum(_padded(s, data) for s in g) // data * p_elt for g in groups]
            block_bytes = gather_bytes[:resharded]  # the blocks come first in `groups`
            if layout.pp > 1:
                calls = runs * (len(groups) + resharded * per_run)
                nbytes = runs * (sum(gather_bytes) + per_run * sum(block_bytes))
            else:
                calls = A * (len(groups) + resharded)
                nbytes = A * (sum(gather_bytes) + sum(block_bytes))
            out["all_gather/dp_sp"].add(calls, nbytes)
            out["reduce_scatter/dp_sp"].add(runs * len(groups) if layout.pp > 1 else len(groups),
                                            (runs if layout.pp > 1 else 1) * sum(sum(_padded(s, data) for s in g) * 4
                                                                                  for g in groups))
    elif data > 1 and layout.dp_backend == "zero":
        for key, flow in zero_traffic(shapes, layout, A, bf16).items():
            out[key].add(flow.calls, flow.bytes)
    return dict(out)


def zero_traffic(shapes: ModelShapes, layout: Layout, accumulation: int, bf16: bool) -> dict[str, Flow]:
    """DeepSpeed ZeRO (modelled, not measured: its collectives bypass comm.py). Flat partitions of the
    whole model: stages 1-2 reduce-scatter fp32 gradients once per step and all-gather updated
    parameters; stage 3 also gathers parameters in forward and backward of every micro-batch."""
    n = layout.dp * layout.sp
    P = shapes.total
    p_elt = 2 if bf16 else 4
    flows = {"reduce_scatter/dp_sp": Flow(None, P * 4), "all_gather/dp_sp": Flow(None, P // n * p_elt)}
    if layout.zero_stage == 3:
        flows["all_gather/dp_sp"] = Flow(None, 2 * accumulation * (P // n) * p_elt)
    return flows


def traffic_table(cfg: Any, layout: Layout) -> dict[str, int]:
    """Bytes per mesh dimension per step, the most any one rank sends (the critical path's)."""
    per_dim: dict[str, int] = {}
    for r in range(layout.pp):
        mine: dict[str, int] = defaultdict(int)
        for key, flow in step_traffic(cfg, layout, r).items():
            mine[key.split("/")[1]] += flow.bytes
        for dim, b in mine.items():
            per_dim[dim] = max(per_dim.get(dim, 0), b)
    return per_dim
