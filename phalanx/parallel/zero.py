"""DeepSpeed ZeRO (stages 1, 2, 3) as a data-parallel back end, driven through DeepSpeed's engine.

phalanx keeps its model, its AdamW (ZeRO partitions its state) and its LR schedule (stepped by the
trainer on the wrapped torch optimizer); DeepSpeed reduces and partitions gradients over every
rank (dp x sp, which is DeepSpeed's data-parallel world while pp = 1), clips, and steps. Gradient
accumulation boundaries are set explicitly from the trainer's micro-batch loop, and the loss
arrives already divided by the number of micro-batches.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn

from phalanx.errors import ConfigError
from phalanx.parallel.data_parallel import TorchDataParallel
from phalanx.parallel.mesh import DATA_DIM
from phalanx.parallel.registry import register


def no_shared_memory_all_reduce() -> None:
    """DeepSpeed's communication back end on a CPU builds a shared-memory all-reduce (the C++ op deepspeed_shm_comm,
    compiled with ninja on first use in every new environment: 82 s here, and a compiler required) that only its
    inference all-reduce calls; ZeRO reduces through torch.distributed. Marked incompatible, it is never built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@register("data", "zero")
class ZeroStrategy(TorchDataParallel):

    # DeepSpeed's state_dict() hands out copies (stage 3 gathers the parameters), so a snapshot cannot keep
    # its sources between steps: it would rebuild the whole state every step. A ZeRO run therefore snapshots
    # at its persist steps and at the end.
    snapshots_every_step = False
    @staticmethod
    def validate(layout: Any, cfg: Any) -> None:
        stage = cfg.parallel.zero_stage
        if stage not in (1, 2, 3):
            raise ConfigError(f"parallel.zero_stage={stage} is not one of 1, 2, 3 (optimizer, +gradients, +parameters)")
        if cfg.train.compile:
            raise ConfigError("train.compile=true with parallel.dp_backend=zero: DeepSpeed's engine owns the module; "
                              "use dp_backend=ddp or fsdp to compile, or set train.compile=false")

    @staticmethod
    def rank_local_state(cfg: Any) -> tuple[str, ...]:
        # Each rank's optimizer partition (with its fp32 master weights) is its own. The module's
        # state_dict is whole on every rank (DeepSpeed gathers ZeRO-3 parameters for it): saved once.
        return ("optim",)

    @staticmethod
    def apply(model: nn.Module, mesh: Any, cfg: Any) -> nn.Module:
        return model  # DeepSpeed wraps model and optimizer together, in wrap_optimizer

    @staticmethod
    def wrap_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, mesh: Any, cfg: Any) -> nn.Module:
        import deepspeed  # heavy: only a zero run pays for it

        world = mesh[DATA_DIM].size() if mesh is not None else 1
        micro, dp = cfg.train.micro_batch_size, cfg.parallel.dp
        accumulation = cfg.train.batch_size // (micro * dp)
        ds_config = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accumulation,
            "train_batch_size": micro * accumulation * world,  # DeepSpeed counts sp ranks as data ranks
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": {"stage": cfg.parallel.zero_stage},
            "bf16": {"enabled": cfg.train.dtype == "bf16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62,
        }
        no_shared_memory_all_reduce()
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                          dist_init_required=False)
        return engine

    @staticmethod
    @contextlib.contextmanager
    def accumulate(model: nn.Module, sync: bool) -> Iterator[None]:
        model.set_gradient_accumulation_boundary(sync)
        yield

    @staticmethod
    def backward(model: nn.Module, loss: torch.Tensor) -> None:
        model.backward(loss, scale_wrt_gas=False)

    @staticmethod
    def step(model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float, pp_group: Any = None) -> torch.Tensor:
        model.step()  # reduce-scatter, clip to gradient_clipping, AdamW on partitions, gather, zero grads
        return torch.tensor(float(model.get_global_grad_norm()))

    @staticmethod
    def state_dict(model: nn.Module, optimizer: Any) -> tuple[dict, dict]:
        if model.zero_optimization_stage() < 3:
            return model.module.state_dict(), model.optimizer.state_dict()
        from deepspeed.runtime.zero import GatheredParameters

        # Stage 3: gather the whole parameters (a collective) so the model state is portable and
        # the same on every rank, like stages 1 and 2.
        with GatheredParameters(list(model.module.parameters())):
            whole = {name: value.detach().clone() for name, value in model.module.state_dict().items()}
        return whole, model.optimizer.state_dict()

    @staticmethod
    def load_state_dict(model: nn.Module, optimizer: Any, model_state: dict, optim_state: dict) -> None:
        if model.zero_optimization_stage() < 3:
            model.module.load_state_dict(model_state)
        # At stage 3 the parameters are partitions restored from the fp32 master weights below.
        # DeepSpeed takes one state per data-parallel rank and reads its own; ours is this rank's.
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        _int_param_ids(optim_state)
        model.optimizer.load_state_dict([optim_state] * world, load_from_fp32_weights=True)


def _int_param_ids(state: Any) -> None:
    """DCP's flattening names every path element `str(key)`, so a restored torch optimizer state has its
    integer parameter ids as "0", "1", ...; torch's load_state_dict keeps such entries under the strings,
    beside the real ones the next step creates (the moments are lost and the next snapshot fails with
    "duplicated flatten key ...state.0.step"). Put the integers back, in place."""
    if isinstance(state, dict):
        if isinstance(state.get("state"), dict) and "param_groups" in state:
            state["state"] = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in state["state"].items()}
        for value in state.values():
            _int_param_ids(value)
    elif isinstance(state, list):
        for value in state:
            _int_param_ids(value)
