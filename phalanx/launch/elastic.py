"""Elastic runs (`fault.elastic`): the layout a run goes on with when it has fewer workers than it asked for.

For a world of W workers the candidates are the planner's (`planner.plan.candidate_layouts`: every factorisation
into pp, sp, dp and ep, pipeline schedules and micro-batch sizes that keep `train.batch_size`) that `validate()`
accepts and that keep the run's data-parallel back end (and ZeRO stage): the user chose those for memory, and
the trajectory does not depend on them. The planner's cost model ranks them on a topology of W devices (the
run's device kind, from presets) and the fastest predicted to fit in device memory is taken. The user can pin
the layouts allowed (`fault.elastic_layouts`, by name).
"""

from __future__ import annotations

import math
from typing import Any, Optional

from phalanx.parallel.layout import Layout


def elastic_layout(cfg: Any, world: int, nodes: int, device: str) -> Optional[Layout]:
    """The layout the planner ranks best for `world` workers on `nodes` nodes of `device` ("cpu" or a preset GPU),
    keeping the back end and the global batch; None when no layout of the config fits `world`."""
    from phalanx.planner.plan import candidate_layouts, plan, valid
    from phalanx.planner.topology import preset

    p = cfg.parallel
    keep = [lay for lay in candidate_layouts(cfg, world)
            if lay.dp_backend == (p.dp_backend if lay.dp * lay.sp > 1 else "ddp") and
            (lay.dp_backend != "zero" or lay.zero_stage == p.zero_stage) and valid(cfg, lay)]
    pinned = set(cfg.fault.elastic_layouts)
    keep = [lay for lay in keep if not pinned or lay.name() in pinned]
    if not keep:
        return None
    per_node = world // nodes if nodes and world % nodes == 0 else world
    topo = preset(device, nodes=world // per_node, gpus_per_node=per_node, dtype=cfg.train.dtype)
    best = plan(cfg, topo, layouts=keep).best
    return None if best is None else best.layout


def no_layout_message(cfg: Any, smallest: int, largest: int) -> str:
    """Why an elastic run cannot go on with `smallest`..`largest` workers, and what would let it."""
    batch = cfg.train.batch_size
    step = math.lcm(*range(max(smallest, 1), largest + 1)) if largest >= smallest else 1
    nearest = max(step, round(batch / step) * step)
    pinned = cfg.fault.elastic_layouts
    among = f" among fault.elastic_layouts={list(pinned)}" if pinned else ""
    return (f"fault.elastic: no layout{among} keeps train.batch_size={batch} and parallel.dp_backend="
            f"{cfg.parallel.dp_backend} on {smallest} to {largest} workers and fits their memory (the batch must "
            f"split into dp x micro-batch); a train.batch_size that every such worker count divides (e.g. "
            f"{nearest}){', more allowed layouts' if pinned else ''} or a lower fault.min_workers lets it shrink, "
            f"as does adding nodes")
