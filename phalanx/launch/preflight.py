"""Checks a launch makes before any process group starts: the layout fits the device's memory.

The planner's memory model (`planner.cost.memory`: parameters, gradients, optimizer state and the activations
of the micro-batches in flight, for the rank of each pipeline stage) against what one rank has: a GPU's memory,
or on CPU the host's memory shared by the ranks on it. A layout predicted not to fit is refused with one line
instead of an out-of-memory error minutes into the run; `parallel.memory_check=false` starts it anyway (the
model is an estimate).
"""

from __future__ import annotations

import os
from typing import Any

from phalanx.errors import ConfigError

GIB = 2**30


def device_memory(cfg: Any, local_world: int) -> tuple[float, str]:
    """(bytes one rank may use, what they are) on the device this rank will train on (`pick_device`)."""
    import torch

    from phalanx.parallel.dist import env_world, pick_device

    device = pick_device(cfg.run.device, env_world()[2])
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return float(props.total_memory), f"{props.name} has"
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host / max(local_world, 1), f"this host's {host / GIB:.1f} GiB over {local_world} local rank(s) is"


def check_memory(cfg: Any, layout: Any, local_world: int) -> None:
    """Raise ConfigError when the planner predicts `layout` needs more memory per rank than the device has."""
    if not cfg.parallel.memory_check:
        return
    from phalanx.planner.cost import memory

    need = max(memory(cfg, layout, rank).total for rank in range(layout.pp))
    have, what = device_memory(cfg, local_world)
    if need > have:
        raise ConfigError(
            f"layout {layout.name()} needs about {need / GIB:.1f} GiB per rank by the planner's estimate, but "
            f"{what} {have / GIB:.1f} GiB: choose a layout that fits (`phalanx plan CONFIG` lists them), "
            f"train.activation_checkpointing=full, a smaller micro-batch or more ranks; "
            f"parallel.memory_check=false starts it anyway"
        )
