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
from phalanx.models.gpt import set_activation_checkpointing
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


def is_deepspeed(model: torch.nn.Module) -> bool:
    return hasattr(model, "optimizer") and hasattr(model, "module")  # a DeepSpeed engine


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient after the data-parallel reduction (DTensor or ZeRO partitions too)."""
    zero = is_deepspeed(model)
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


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole value (DTensors gathered)."""
    return {_clean(name): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters()}


def all_stages(tensors: dict[str, torch.Tensor], trainer: Trainer, ctx: Any) -> dict[str, torch.Tensor]:
    if trainer.pipeline is not None:  # each stage holds its own parameters: collect them all
        every = [None] * ctx.world_size
        torch.distributed.all_gather_object(every, tensors)
        tensors = {name: tensor for stage in every for name, tensor in stage.items()}
    return tensors


def all_grads(trainer: Trainer, ctx: Any) -> dict[str, torch.Tensor]:
    return all_stages(full_grads(trainer.model), trainer, ctx)


def one_step(overrides: list[str], world: int, run_dir: str, recompute: bool = False, params: bool = False) -> dict:
    """Rank 0's loss and gradients of one step; with `recompute`, also those of the same step taken again with
    every block's forward recomputed in backward (train.activation_checkpointing=full), under "recomputed";
    with `params`, the whole weights the layout started from (under "params"; not for DeepSpeed)."""
    cfg = validate(load_config(CONFIG, [*TINY, *overrides, f"run.dir={run_dir}"]), world)
    ctx = init_distributed(cfg)
    try:
        trainer = Trainer(cfg, ctx, run_dir)
        start = all_stages(full_params(trainer.model), trainer, ctx) if params else None
        batch = trainer.data.next_step()
        loss = trainer.forward_backward(batch)
        sent = comm.STATS.take()  # what this rank's forward and backward sent
        result = {"loss": trainer._dp_mean(loss), "grads": all_grads(trainer, ctx), "rank": ctx.rank, "comm": sent,
                  "params": start}
        if trainer.moe_layers:
            group = ctx.mesh["dp_sp"].get_group() if ctx.distributed else None
            result["moe"] = moe_metrics(trainer.moe_layers, group, trainer.data.accumulation)
        if recompute:
            # DeepSpeed's partitioned gradients are its optimizer's (ZeRO-3 accumulates into them until it resets)
            (trainer.model.optimizer if is_deepspeed(trainer.model) else trainer.model).zero_grad(set_to_none=True)
            assert set_activation_checkpointing(trainer.model, "full") > 0
            loss = trainer.forward_backward(batch)
            result["recomputed"] = {"loss": trainer._dp_mean(loss), "grads": all_grads(trainer, ctx)}
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
    """One step on `world` ranks, and the same step with activation checkpointing (both checked by
    assert_same_step against one process without it)."""
    with tempfile.TemporaryDirectory() as tmp:
        return spawn(one_step, world, overrides, world, tmp, True)


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
    if "recomputed" in got:  # activation checkpointing changes no gradient, on any layout
        assert_same_step(got["recomputed"], ref, rtol, atol)
    assert got["loss"] == __import__("pytest").approx(ref["loss"], rel=rtol)
    assert got["grads"].keys() == ref["grads"].keys()
    for name, grad in ref["grads"].items():
        assert grad.abs().sum() > 0, f"{name}: zero reference gradient"
        torch.testing.assert_close(got["grads"][name], grad, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
