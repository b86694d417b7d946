"""`parallelize`: the strategies of a layout applied to a model, in the one order they compose.

  1. the model arrives on the meta device (no memory);
  2. strategies that reshape it on meta: sequence, then expert (when the model has MoE layers: sp
     wiring, and experts sharded over ep), then pipeline (this rank's blocks and their stages);
  3. a data-parallel back end that shards parameters (`on_meta`, e.g. FSDP) wraps the meta model,
     or each pipeline stage;
  4. materialise on the device, initialised from the seed (identical on every rank) or read from
     model.init_from (each rank its own region);
  5. a data-parallel back end that wraps real tensors (DDP) does so.

Each kind of strategy has its protocol in `registry`; the trainer calls the strategies it gets back
here and never looks one up itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from phalanx.models import materialize
from phalanx.models.gpt import set_activation_checkpointing
from phalanx.parallel import registry
from phalanx.parallel.expert import moe_layers
from phalanx.parallel.layout import Layout
from phalanx.parallel.pipeline import StagePlan


@dataclass
class Parallelized:
    """What `parallelize` made of a model for this rank."""

    model: nn.Module  # this rank's model: its parameters are what the optimizer and the state see
    stages: list[nn.Module]  # what runs: [model wrapped by the data-parallel back end], or this rank's stages
    plans: Optional[list[StagePlan]]  # with pipeline parallelism: the plan of each of this rank's stages
    data: registry.DataParallelStrategy
    sequence: Optional[registry.SequenceStrategy]
    expert: Optional[registry.ExpertStrategy]


def parallelize(model: nn.Module, *, layout: Layout, mesh: Any, cfg: Any, device: torch.device,
                seed: int) -> Parallelized:
    """Apply `layout`'s strategies to `model` (on meta) over `mesh` and materialise it on `device`."""
    set_activation_checkpointing(model, cfg.train.activation_checkpointing)
    sequence = expert = None
    if layout.sp > 1:
        sequence = registry.get("sequence", cfg.parallel.sp_backend, "parallel.sp_backend")
        model = sequence.apply(model, mesh, cfg)
    if moe_layers(model) and mesh is not None:
        expert = registry.get("expert", cfg.parallel.ep_backend, "parallel.ep_backend")
        model = expert.apply(model, mesh, cfg)
    # Pipeline: this rank keeps its blocks in `model` and runs them as stage modules; data
    # parallelism wraps each stage (what runs), the optimizer and the state see `model`.
    stages, plans = [model], None
    if layout.pp > 1:
        parts = registry.get("pipeline", layout.pp_schedule, "parallel.pp_schedule").split(model, mesh, cfg)
        model, stages, plans = parts.model, list(parts.stages), [stage.plan for stage in parts.stages]
    data = registry.get("data", layout.dp_backend, "parallel.dp_backend")
    if data.on_meta:
        stages = [data.apply(stage, mesh, cfg) for stage in stages]
    materialize(model, device, seed, cfg.model.init_from)
    if not data.on_meta:
        stages = [data.apply(stage, mesh, cfg) for stage in stages]
    return Parallelized(model if plans is not None else stages[0], stages, plans, data, sequence, expert)
