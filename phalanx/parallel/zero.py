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
        """What a torch back end saves, whole on every rank: the fp32 master weights and AdamW's moments per
        parameter name (gathered from the partitions), and the param groups naming their parameters. So a ZeRO
        state loads into any layout, and any layout's state into ZeRO (collective). Taken before the first step,
        the moments are created as zeros with step 0, exactly what AdamW's first step starts from."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        names = {id(p): name for name, p in model.module.named_parameters()}
        state: dict[str, dict] = {}
        groups: list[dict] = []
        for hyper, flat, params in _partitions(model.optimizer):
            moments = model.optimizer.optimizer.state[flat]
            groups.append({**{k: v for k, v in hyper.items() if k != "params"},
                           "params": [names[id(p)] for p in params]})
            for param in params:
                state[names[id(param)]] = {
                    key: value.clone() if key == "step" else
                    safe_get_full_optimizer_state(param, key).reshape(_shape(param))
                    for key, value in moments.items()}
        model_state = {name: safe_get_full_fp32_param(param).reshape(_shape(param)).clone()
                       for name, param in model.module.named_parameters()}
        return model_state, {"state": state, "param_groups": groups}

    @staticmethod
    def load_state_dict(model: nn.Module, optimizer: Any, model_state: dict, optim_state: dict) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        params = dict(model.module.named_parameters())
        if model.zero_optimization_stage() < 3:
            model.module.load_state_dict(model_state)
        else:
            from deepspeed.runtime.zero import GatheredParameters

            with GatheredParameters(list(params.values()), modifier_rank=0):  # repartitioned from rank 0's on exit
                model.module.load_state_dict(model_state)
        saved_groups = optim_state["param_groups"]
        for hyper, flat, members in _partitions(model.optimizer):
            ids = {id(p) for p in members}
            saved = next(g for g in saved_groups if set(g["params"]) >= {n for n, p in params.items() if id(p) in ids})
            hyper.update({k: v for k, v in saved.items() if k != "params"})
            # one step counter per partition: its parameters' counters are equal (they were stepped together)
            model.optimizer.optimizer.state[flat]["step"].copy_(optim_state["state"][saved["params"][0]]["step"])
        for name, param in params.items():
            safe_set_full_fp32_param(param, model_state[name].to(torch.float32))
            for key, value in optim_state["state"][name].items():
                if key != "step":
                    safe_set_full_optimizer_state(param, value, key)


def _shape(param: torch.Tensor) -> torch.Size:
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


def _partitions(zero: Any) -> list[tuple[dict, torch.Tensor, list[torch.Tensor]]]:
    """(param group, this rank's flat fp32 partition, the parameters it partitions) for each of DeepSpeed's
    groups, with AdamW's state created for every partition (zeros, step 0: what its first step creates) and
    linked to the parameters' fragments (stages 1 and 2 link it after the first group's first step only, so
    the other groups' fragments stay unlinked: re-linked here)."""
    base = zero.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # stage 3: sub-groups, each in one param group
        parts = [(base.param_groups[zero.sub_group_to_group_id[k]], flat, zero.fp16_groups[k])
                 for k, flat in enumerate(zero.fp32_partitioned_groups_flat)]
    else:
        parts = list(zip(base.param_groups, zero.single_partition_of_fp32_groups, zero.bit16_groups))
    for hyper, flat, _ in parts:
        if not base.state.get(flat):
            on_device = hyper.get("fused") or hyper.get("capturable")
            step = torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu")
            base.state[flat] = {"step": step, "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    if hasattr(zero, "_hp_optimizer_states_linked"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    return parts
