"""Strategy registry: a strategy has `validate(layout, cfg)` and `apply(model, mesh, cfg)`.

Strategies are looked up by (kind, name), so a user adds one with `@register("data", "mine")`
without editing the trainer. Kinds: data, sequence, expert, pipeline. A data-parallel back end
also owns the step and the state (subclass `data_parallel.TorchDataParallel`); a sequence
strategy also shards the batch (`shard_batch`, see `sequence.UlyssesStrategy`).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch.nn as nn

from phalanx.errors import ConfigError

KINDS = ("data", "sequence", "expert", "pipeline")
_REGISTRY: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}


class Strategy(Protocol):
    def validate(self, layout: Any, cfg: Any) -> None: ...

    def apply(self, model: nn.Module, mesh: Any, cfg: Any) -> nn.Module: ...


def register(kind: str, name: str) -> Callable[[Any], Any]:
    if kind not in KINDS:
        raise ValueError(f"strategy kind {kind!r} is not one of {KINDS}")

    def wrap(strategy: Any) -> Any:
        _REGISTRY[kind][name] = strategy
        return strategy

    return wrap


def available(kind: str) -> list[str]:
    return sorted(_REGISTRY[kind])


def get(kind: str, name: str, key: str) -> Strategy:
    """The strategy registered as (kind, name); `key` is the config key that chose it."""
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        names = ", ".join(available(kind)) or "none"
        raise ConfigError(f"{key}={name!r}: no {kind}-parallel strategy of that name; available: {names}") from None
