"""Pipeline parallelism: the GPT's blocks split into stages over the pp ranks.

Stage s holds a contiguous run of blocks; the embedding goes with the first stage, the final
norm and output head with the last. Under interleaving each rank holds `pp_virtual_stages`
stages, rank r holding stages r, r + pp, r + 2 pp, ... (the layout torch's interleaved 1F1B
expects). The split balances parameters (embedding and head counted with their stages) unless
`parallel.pp_split` gives the blocks per stage.

A rank keeps one GPT holding only its own blocks (so parameter names, and checkpoint keys, are
those of the whole model) and one `StageModule` per stage it runs: a view over that GPT's
modules, which is what data parallelism wraps and `torch.distributed.pipelining` executes.
The schedules that run the stages every step are in `pipeline_schedule.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from phalanx.errors import ConfigError
from phalanx.parallel.registry import register

SCHEDULES = ("gpipe", "1f1b", "interleaved")


def num_stages(p: Any) -> int:
    return p.pp * (p.pp_virtual_stages if p.pp_schedule == "interleaved" else 1)


def stage_rank(stage: int, pp: int) -> int:
    """The pp rank running `stage` (looped layout)."""
    return stage % pp


def balanced_split(costs: list[int], first_extra: int, last_extra: int, stages: int) -> list[int]:
    """Blocks per stage, contiguous, minimising the largest stage's cost (linear partition, exact).

    `costs` are the blocks' parameter counts; the first and last stage also carry the embedding and
    the head. Ties go to the earliest split, so the split is the same on every rank.
    """
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: minimal max cost putting blocks [0, i) into stages [0, s); cut[s][i]: where stage s-1 starts
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                cost = prefix[i] - prefix[j] + (first_extra if s == 1 else 0) + (last_extra if s == stages else 0)
                value = max(best[s - 1][j], cost)
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    sizes, i = [], n
    for s in range(stages, 0, -1):
        j = cut[s][i]
        sizes.append(i - j)
        i = j
    return sizes[::-1]


@dataclass(frozen=True)
class StagePlan:
    index: int  # the stage's position in the pipeline
    blocks: tuple[str, ...]  # names in GPT.layers
    first: bool
    last: bool


def stage_blocks(stages: int, pp_split: Optional[Sequence[int]], costs: list[int], first_extra: int,
                 last_extra: int) -> list[range]:
    """Block indices of every stage, in pipeline order: `parallel.pp_split` blocks per stage, or the
    `balanced_split` of the blocks' parameter counts `costs` (the trainer's and the planner's one split)."""
    sizes = list(pp_split) if pp_split is not None else balanced_split(costs, first_extra, last_extra, stages)
    out, start = [], 0
    for size in sizes:
        out.append(range(start, start + size))
        start += size
    return out


def plan_stages(model: nn.Module, cfg: Any) -> list[StagePlan]:
    """Every stage of the pipeline (all ranks'), from `parallel.pp_split` or balanced by parameters."""
    stages = num_stages(cfg.parallel)
    names = list(model.layers.keys())
    costs = [sum(t.numel() for t in model.layers[n].parameters()) for n in names]
    first = model.tok_embeddings.weight.numel()
    last = model.output.weight.numel() + model.norm.weight.numel()
    split = stage_blocks(stages, cfg.parallel.pp_split, costs, first, last)
    return [StagePlan(s, tuple(names[i] for i in blocks), s == 0, s == stages - 1) for s, blocks in enumerate(split)]


class StageModule(nn.Module):
    """One pipeline stage: (B, T) tokens or (B, T, d) activations -> activations or (B, T, vocab) logits.

    Registers only its own modules (embedding / blocks / head), so data parallelism over it sees
    exactly this stage's parameters; RoPE tables and positions are read from the rank's GPT.
    """

    def __init__(self, gpt: nn.Module, plan: StagePlan):
        super().__init__()
        object.__setattr__(self, "gpt", gpt)  # not a submodule: other stages' modules stay out
        self.plan = plan
        self.tok_embeddings = gpt.tok_embeddings if plan.first else None
        self.layers = nn.ModuleDict({name: gpt.layers[name] for name in plan.blocks})
        self.norm = gpt.norm if plan.last else None
        self.output = gpt.output if plan.last else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(h)
        cos, sin = self.gpt.rope(h.shape[1])
        for block in self.layers.values():
            h = block(h, cos, sin)
        if self.output is not None:
            h = self.output(self.norm(h))
        return h


@dataclass
class PipelineParts:
    model: nn.Module  # this rank's GPT (its blocks only): parameters, state, optimizer
    stages: list[StageModule]  # the stages this rank runs, in pipeline order


class PipelineSplit:
    """Splits the model into stages and keeps this rank's. Registered once per schedule name."""

    on_meta = True

    def __init__(self, schedule: str):
        self.schedule = schedule

    def validate(self, layout: Any, cfg: Any) -> None:
        p, m = cfg.parallel, cfg.model
        if layout.pp == 1:
            return
        if p.pp_schedule == "interleaved" and p.pp_virtual_stages < 2:
            raise ConfigError(f"parallel.pp_virtual_stages={p.pp_virtual_stages}: interleaved 1F1B needs at least 2 "
                              f"stages per rank; set it to 2 or more, or parallel.pp_schedule=1f1b")
        stages = num_stages(p)
        if p.pp_split is not None:
            split = list(p.pp_split)
            if len(split) != stages or any(int(n) < 1 for n in split) or sum(split) != m.n_layers:
                raise ConfigError(f"parallel.pp_split={split} must list {stages} positive block counts (one per stage) "
                                  f"summing to model.n_layers({m.n_layers})")
        elif m.n_layers < stages:
            raise ConfigError(f"model.n_layers({m.n_layers}) < pipeline stages ({stages} = pp({p.pp})"
                              f"{f' * pp_virtual_stages({p.pp_virtual_stages})' if stages != p.pp else ''}); every stage "
                              f"needs a block: lower parallel.pp or raise model.n_layers")
        if m.tie_embeddings:
            raise ConfigError("model.tie_embeddings=true with parallel.pp>1: the embedding lives on the first stage and "
                              "the head on the last, so they cannot share a weight; set model.tie_embeddings=false")
        if p.dp_backend == "zero":
            raise ConfigError("parallel.pp>1 with parallel.dp_backend=zero: DeepSpeed's engine clips and steps over "
                              "its own data-parallel group and cannot see the other stages' gradients; use "
                              "dp_backend=ddp or fsdp with pipeline parallelism")
        if cfg.train.compile:
            raise ConfigError("train.compile=true with parallel.pp>1 is not supported yet; set train.compile=false")
        micro = layout.pipeline_microbatches(cfg.train.batch_size)
        if p.pp_schedule in ("1f1b", "interleaved") and micro < p.pp:
            raise ConfigError(
                f"parallel.microbatches={micro} < parallel.pp({p.pp}): {p.pp_schedule} needs at least one "
                f"micro-batch per stage in flight; raise train.batch_size or lower train.micro_batch_size")
        if p.pp_schedule == "interleaved" and micro % p.pp:
            raise ConfigError(f"parallel.microbatches={micro} must be a multiple of parallel.pp({p.pp}) for the "
                              f"interleaved schedule")

    def split(self, model: nn.Module, mesh: Any, cfg: Any) -> PipelineParts:
        """Keep this rank's blocks in `model` (the rest deleted, on meta) and build its stage views."""
        pp, rank = cfg.parallel.pp, mesh.get_local_rank("pp")
        plans = plan_stages(model, cfg)
        mine = [plan for plan in plans if stage_rank(plan.index, pp) == rank]
        keep = {name for plan in mine for name in plan.blocks}
        for name in list(model.layers.keys()):
            if name not in keep:
                del model.layers[name]
        if not any(plan.first for plan in mine):
            model.tok_embeddings = None
        if not any(plan.last for plan in mine):
            model.norm, model.output = None, None
        return PipelineParts(model, [StageModule(model, plan) for plan in mine])


for _name in SCHEDULES:
    register("pipeline", _name)(PipelineSplit(_name))
