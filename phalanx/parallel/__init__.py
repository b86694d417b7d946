"""Parallel strategies composed on one device mesh (see ARCHITECTURE.md)."""

from __future__ import annotations

from typing import Any

from phalanx.parallel import data_parallel, expert, pipeline, sequence, zero  # noqa: F401  (register the strategies)
from phalanx.parallel.layout import Layout
from phalanx.parallel.registry import available, get, register

# mesh dimension -> (strategy kind, config key naming the strategy)
_KIND_OF_DIM = {"sp": ("sequence", "sp_backend"), "ep": ("expert", "ep_backend"), "pp": ("pipeline", "pp_schedule")}


def validate(cfg: Any, world_size: int = 1) -> Any:
    """Check every field and cross-field rule of `cfg`, its model kind and a strategy for each parallel
    degree, and the data files' own description (vocabulary); resolve `parallel.dp`. Raises ConfigError before
    any process group exists."""
    from phalanx.config import validate_fields
    from phalanx.data import validate_data
    from phalanx.models import MODEL_KINDS  # the registry; no torch work happens here

    dp = validate_fields(cfg, world_size, tuple(MODEL_KINDS))
    validate_data(cfg)
    validate_layout(cfg, world_size)
    cfg.parallel.dp = dp
    return cfg


def validate_layout(cfg: Any, world_size: int) -> Layout:
    """Check the degrees, the rank order and that a strategy exists for every degree above one, before any
    process group."""
    p = cfg.parallel
    layout = Layout.from_config(cfg, world_size)
    get("data", p.dp_backend, "parallel.dp_backend").validate(layout, cfg)
    for dim, (kind, key) in _KIND_OF_DIM.items():
        degree = getattr(layout, dim)
        if degree > 1:
            get(kind, getattr(p, key), f"parallel.{key}").validate(layout, cfg)
    return layout


__all__ = ["Layout", "validate", "validate_layout", "register", "get", "available"]
