"""Parallel strategies composed on one device mesh (see ARCHITECTURE.md)."""

from __future__ import annotations

from typing import Any

from phalanx.errors import ConfigError
from phalanx.parallel import data_parallel  # noqa: F401  (registers ddp)
from phalanx.parallel.mesh import ParallelDims
from phalanx.parallel.registry import available, get, register

_KIND_OF_DIM = {"sp": "sequence", "ep": "expert", "pp": "pipeline"}


def validate_layout(cfg: Any, world_size: int, dp: int) -> ParallelDims:
    """Check the degrees and that a strategy exists for every degree above one, before any process group."""
    p = cfg.parallel
    dims = ParallelDims(dp=dp, sp=p.sp, ep=p.ep, pp=p.pp, world_size=world_size)
    get("data", p.dp_backend, "parallel.dp_backend").validate(dims, cfg)
    for dim, kind in _KIND_OF_DIM.items():
        if getattr(dims, dim) > 1:
            if not available(kind):
                raise ConfigError(
                    f"parallel.{dim}={getattr(dims, dim)}: no {kind}-parallel strategy is registered in this phalanx "
                    f"version; set parallel.{dim}=1"
                )
            for name in available(kind):
                get(kind, name, f"parallel.{dim}").validate(dims, cfg)
    return dims


__all__ = ["ParallelDims", "validate_layout", "register", "get", "available"]
