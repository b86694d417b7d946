"""What a layout really does on this machine: collective bytes, state memory and step time per rank.

The planner's predictions are checked against these numbers (tests/planner, benchmarks/plan.py).
`measure_layout` runs the real Trainer in `world` local gloo processes on loopback, so everything
measured is what `phalanx train` would do: bytes come from `phalanx/telemetry/comm.py`, memory from
the tensors each rank holds, time from the trainer's own step.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from typing import Any

import torch


def _local_bytes(tensors: Any) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds (its shards only)."""
    params = list(model.parameters())
    optim = [v for state in optimizer.state.values() for v in state.values()
             if isinstance(v, torch.Tensor) and v.dim() > 0]  # AdamW's scalar `step` is not state that scales
    return {"params": _local_bytes(params), "grads": _local_bytes(p.grad for p in params),
            "optim": _local_bytes(optim)}


def _rank_measure(overrides: list[str], world: int, run_dir: str, steps: int, config: str) -> dict:
    from phalanx.config import load_config
    from phalanx.parallel import validate
    from phalanx.parallel.dist import shutdown, start_process_groups
    from phalanx.planner.placement import mesh_order
    from phalanx.telemetry import comm
    from phalanx.trainer import Trainer

    cfg = validate(load_config(config, [*overrides, "parallel.comm_stats=true", f"run.dir={run_dir}",
                                        "run.resume=false"]), world)
    ctx = start_process_groups(cfg, lambda world_size, per_node: mesh_order(cfg, world_size, per_node))
    try:
        trainer = Trainer(cfg, ctx, run_dir)
        trainer.train_step(trainer.data.next_step())  # warm-up: lazy state, pipeline shape inference
        comm.STATS.take()
        loss = trainer.forward_backward(trainer.data.next_step())
        memory = state_bytes(trainer.model, trainer.optimizer)  # gradients exist until the step clears them
        trainer.optimizer_step()
        sent = comm.STATS.take()
        comm.enable(False)  # timed steps run as a user's would, without counting
        seconds = []
        for _ in range(steps):
            if ctx.distributed:
                torch.distributed.barrier()
            start = time.perf_counter()
            loss, _ = trainer.train_step(trainer.data.next_step())
            float(loss)
            seconds.append(time.perf_counter() - start)
        result = {"rank": ctx.rank, "comm": sent, "memory": memory, "seconds": seconds}
        if ctx.distributed:
            every: list = [None] * ctx.world_size
            torch.distributed.all_gather_object(every, result)
            torch.distributed.barrier()
        else:
            every = [result]
        snapshots = getattr(trainer, "snapshots", None)
        if snapshots is not None:  # a measurement is a finished run: its node's checkpoint keeper may exit
            snapshots.close(release=True)
        del trainer
        gc.collect()  # wrappers holding process groups go before the groups do
        return {"ranks": every}
    finally:
        shutdown()


def measure_layout(config: str, overrides: list[str], world: int, steps: int = 0, threads: int = 1) -> list[dict]:
    """Per rank: {"comm": {"kind/dim": {calls, bytes, seconds}} of one optimizer step after a warm-up,
    "memory": {params, grads, optim} bytes, "seconds": wall time of `steps` further steps}."""
    from phalanx.parallel.local_ranks import run_local

    with tempfile.TemporaryDirectory() as tmp:
        args = (list(overrides), world, tmp, steps, config)
        if world == 1:
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                os.environ.pop(key, None)
            torch.set_num_threads(threads)
            return _rank_measure(*args)["ranks"]
        return run_local(_rank_measure, world, *args, threads=threads)["ranks"]
