"""Run one training step in N gloo processes and in one process, and return what to compare.

Ranks are spawned (not forked) on loopback, once per session, and reused (`spawn`); rank 0 returns the mean
loss and every parameter's full gradient (after the data-parallel reduction).
"""

from __future__ import annotations

import gc
import os
import random
import tempfile
from typing import Any, Callable

import torch
from torch.distributed.tensor import DTensor

from phalanx.config import load_config
from phalanx.launch.run import init_distributed
from phalanx.parallel import validate
from phalanx.parallel.dist import shutdown
from phalanx.parallel.local_ranks import run_local
from phalanx.parallel.expert import moe_metrics
from phalanx.telemetry import comm
from phalanx.trainer import Trainer
from tests.helpers import CONFIG, POOL_SIZE, TINY


def _clean(name: str) -> str:
    for wrapper in ("module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient after the data-parallel reduction (DTensor or ZeRO partitions too)."""
    zero = hasattr(model, "optimizer") and hasattr(model, "module")  # a DeepSpeed engine
    if zero:
        from deepspeed.utils import safe_get_full_grad
        model = model.module
    grads = {}
    for name, param in model.named_parameters():
        grad = safe_get_full_grad(param) if zero else param.grad
        if isinstance(grad, DTensor):
            grad = grad.full_tensor()
        grads[_clean(name)] = grad.detach().clone()
    return grads


def one_step(overrides: list[str], world: int, run_dir: str) -> dict:
    cfg = validate(load_config(CONFIG, [*TINY, *overrides, f"run.dir={run_dir}"]), world)
    ctx = init_distributed(cfg)
    try:
        trainer = Trainer(cfg, ctx, run_dir)
        loss = trainer.forward_backward(trainer.data.next_step())
        sent = comm.STATS.take()  # what this rank's forward and backward sent
        grads = full_grads(trainer.model)
        if trainer.pipeline is not None:  # each stage holds its own parameters: collect them all
            every = [None] * ctx.world_size
            torch.distributed.all_gather_object(every, grads)
            grads = {name: grad for stage_grads in every for name, grad in stage_grads.items()}
        result = {"loss": trainer._dp_mean(loss), "grads": grads, "rank": ctx.rank, "comm": sent}
        if trainer.moe_layers:
            group = ctx.mesh["dp_sp"].get_group() if ctx.distributed else None
            result["moe"] = moe_metrics(trainer.moe_layers, group, trainer.data.accumulation)
        if ctx.distributed:
            torch.distributed.barrier()  # no rank tears down while another still talks to it
        del trainer
        gc.collect()  # wrappers holding process groups go before the groups do
        return result
    finally:
        shutdown()


def spawn(fn: Callable[..., Any], world: int, *args: Any) -> Any:
    """Run `fn(*args)` on `world` local ranks (RANK etc. set, loopback); rank 0's return value."""
    return run_local(fn, world, *args, pool_size=POOL_SIZE)


def spawn_one_step(overrides: list[str], world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return spawn(one_step, world, overrides, world, tmp)


def reference_one_step(overrides: list[str]) -> dict:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    with tempfile.TemporaryDirectory() as tmp:
        layout_free = [o for o in overrides if not o.startswith("parallel.")]
        return one_step(layout_free, 1, tmp)


def fresh_seed() -> list[str]:
    seed = random.SystemRandom().randrange(1 << 30)
    print(f"run.seed={seed}")
    return [f"run.seed={seed}"]


def assert_same_step(got: dict, ref: dict, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    assert got["loss"] == __import__("pytest").approx(ref["loss"], rel=rtol)
    assert got["grads"].keys() == ref["grads"].keys()
    for name, grad in ref["grads"].items():
        assert grad.abs().sum() > 0, f"{name}: zero reference gradient"
        torch.testing.assert_close(got["grads"][name], grad, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
