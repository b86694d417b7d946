"""Strategy registry: strategies are looked up by (kind, name), so a user adds one with
`@register("data", "mine")` without editing the trainer. Each kind has its protocol below; every
strategy validates a layout before any process group exists, and `parallelize` applies them.

- data: a data-parallel back end; it also owns accumulation, backward, the step and the state
  (subclass `data_parallel.TorchDataParallel`);
- sequence: rewires attention on meta and shards each batch along the sequence;
- expert: shards MoE experts over ep and reduces their gradients over their own group;
- pipeline: splits the model into this rank's blocks and stage modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ContextManager, Literal, Protocol, overload

import torch
import torch.nn as nn

from phalanx.errors import ConfigError

if TYPE_CHECKING:
    from phalanx.parallel.layout import Layout

KINDS = ("data", "sequence", "expert", "pipeline")
_REGISTRY: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}


class DataParallelStrategy(Protocol):
    on_meta: bool  # True: wraps the meta model, before materialisation (sharding back ends)
    snapshots_every_step: bool  # False: its state_dict() may not be taken between steps

    def validate(self, layout: "Layout", cfg: Any) -> None: ...

    def apply(self, model: nn.Module, mesh: Any, cfg: Any) -> nn.Module: ...

    def wrap_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, mesh: Any,
                       cfg: Any) -> nn.Module: ...

    def accumulate(self, model: nn.Module, sync: bool) -> ContextManager[None]: ...

    def backward(self, model: nn.Module, loss: torch.Tensor) -> None: ...

    def reduce_pipeline_gradients(self, model: nn.Module, mesh: Any) -> None: ...

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float,
             pp_group: Any = None) -> torch.Tensor: ...

    def state_dict(self, model: nn.Module, optimizer: Any) -> tuple[dict, dict]: ...

    def load_state_dict(self, model: nn.Module, optimizer: Any, model_state: dict, optim_state: dict) -> None: ...


class SequenceStrategy(Protocol):
    def validate(self, layout: "Layout", cfg: Any) -> None: ...

    def apply(self, model: nn.Module, mesh: Any, cfg: Any) -> nn.Module: ...

    def shard_batch(self, batch: torch.Tensor, mesh: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class ExpertStrategy(Protocol):
    def validate(self, layout: "Layout", cfg: Any) -> None: ...

    def apply(self, model: nn.Module, mesh: Any, cfg: Any) -> nn.Module: ...

    def reduce_gradients(self, model: nn.Module) -> None: ...


class PipelineStrategy(Protocol):
    def validate(self, layout: "Layout", cfg: Any) -> None: ...

    def split(self, model: nn.Module, mesh: Any, cfg: Any) -> Any:
        """This rank's blocks kept in `model` and its stages: a `pipeline.PipelineParts` (which imports
        this module to register itself)."""


def register(kind: str, name: str) -> Callable[[Any], Any]:
    if kind not in KINDS:
        raise ValueError(f"strategy kind {kind!r} is not one of {KINDS}")

    def wrap(strategy: Any) -> Any:
        _REGISTRY[kind][name] = strategy
        return strategy

    return wrap


def available(kind: str) -> list[str]:
    return sorted(_REGISTRY[kind])


@overload
def get(kind: Literal["data"], name: str, key: str) -> DataParallelStrategy: ...
@overload
def get(kind: Literal["sequence"], name: str, key: str) -> SequenceStrategy: ...
@overload
def get(kind: Literal["expert"], name: str, key: str) -> ExpertStrategy: ...
@overload
def get(kind: Literal["pipeline"], name: str, key: str) -> PipelineStrategy: ...


def get(kind: str, name: str, key: str) -> Any:
    """The strategy registered as (kind, name); `key` is the config key that chose it."""
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        names = ", ".join(available(kind)) or "none"
        raise ConfigError(f"{key}={name!r}: no {kind}-parallel strategy of that name; available: {names}") from None
