"""The layout: every parallel degree, the rank order, and the choices that change memory, time and traffic.

One typed value answers "how is this run parallelised": the trainer builds its `DeviceMesh` from it, the
strategies validate against it, and the planner enumerates, costs and writes back `Layout`s. Mesh
dimensions are always (pp, dp, sp); `order` (outermost first) says which of them varies fastest over the
global ranks, by default pp, dp, sp: with ranks numbered node by node the sequence-parallel group (the
heaviest all-to-all traffic) stays inside a node, then data parallel, then pipeline stages span nodes.
`parallel.order: auto` lets the planner choose (`phalanx/planner/placement.py`), e.g. dp innermost when
FSDP's all-gathers outweigh sp.
"""

from __future__ import annotations

import copy
from dataclasses import InitVar, dataclass, replace
from typing import TYPE_CHECKING, Any, Optional

from phalanx.errors import ConfigError
from phalanx.parallel.mesh import DATA_DIM, EXPERT_DATA_DIM, EXPERT_DIM, MESH_ORDER, ParallelMesh

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

# Layout fields that are config keys of the same name in the parallel section
_PARALLEL_KEYS = ("dp", "sp", "ep", "pp", "dp_backend", "zero_stage", "pp_schedule", "pp_virtual_stages",
                  "microbatches")


def parse_order(value: Any) -> Optional[tuple[str, ...]]:
    """`parallel.order`: "auto" -> None (the planner places the ranks); "pp,dp,sp"-style -> the tuple."""
    if value == "auto":
        return None
    order = tuple(part.strip() for part in str(value).split(","))
    _check_order(order, value)
    return order


def _check_order(order: tuple[str, ...], value: Any) -> None:
    if sorted(order) != sorted(MESH_ORDER):
        raise ConfigError(f"parallel.order={value!r} must be auto or a permutation of pp,dp,sp (outermost first), "
                          f"e.g. pp,dp,sp")


@dataclass(frozen=True)
class Layout:
    """Degrees of every parallelism and how they run; validates itself (against `world_size` when given)."""

    dp: int
    sp: int = 1
    ep: int = 1
    pp: int = 1
    dp_backend: str = "ddp"  # ddp | fsdp | zero
    zero_stage: int = 1
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 2
    microbatches: Any = "auto"  # pipeline micro-batches per schedule run
    micro_batch_size: int = 1  # sequences per rank per forward
    activation_checkpointing: bool = False  # train.activation_checkpointing=full: every block recomputed in backward
    order: tuple[str, ...] = MESH_ORDER  # rank order, outermost first: a permutation of MESH_ORDER
    world_size: InitVar[Optional[int]] = None  # the processes launched, which the degrees must fill

    def __post_init__(self, world_size: Optional[int]) -> None:
        for name in ("dp", "sp", "ep", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{name}={value!r} must be a positive integer")
        if world_size is not None and self.world != world_size:
            raise ConfigError(
                f"dp({self.dp}) * sp({self.sp}) * pp({self.pp}) = {self.world} != WORLD_SIZE({world_size}); "
                f"launch {self.world} processes or change parallel degrees (parallel.dp=auto fills the rest)"
            )
        _check_order(self.order, ",".join(self.order))
        if (self.dp * self.sp) % self.ep:
            raise ConfigError(
                f"parallel.ep({self.ep}) must divide dp({self.dp}) * sp({self.sp}) = {self.dp * self.sp}"
            )

    @classmethod
    def from_config(cls, cfg: Any, world_size: Optional[int] = None,
                    order: Optional[tuple[str, ...]] = None) -> "Layout":
        """The layout `cfg` describes. With `world_size`, parallel.dp=auto is resolved and the degrees must fill
        it; without, parallel.dp must be a number (a validated config). `order` replaces `parallel.order`,
        whose auto stands for phalanx's default until the planner places the ranks."""
        from phalanx.config import resolve_dp

        p = cfg.parallel
        values = {key: getattr(p, key) for key in _PARALLEL_KEYS}
        values["dp"] = resolve_dp(cfg, world_size) if world_size is not None else int(p.dp)
        order = order or parse_order(p.order) or MESH_ORDER
        return cls(**values, micro_batch_size=cfg.train.micro_batch_size, order=order, world_size=world_size,
                   activation_checkpointing=cfg.train.activation_checkpointing == "full")

    def config_values(self) -> dict[str, Any]:
        """{"section.key": value} of every config key that selects this layout."""
        values = {f"parallel.{key}": getattr(self, key) for key in _PARALLEL_KEYS}
        values["parallel.order"] = ",".join(self.order)
        values["train.micro_batch_size"] = self.micro_batch_size
        if self.activation_checkpointing:  # (without, the config's own choice stays: selective is not modelled)
            values["train.activation_checkpointing"] = "full"
        return values

    def to_overrides(self) -> list[str]:
        """`section.key=value` overrides that select this layout on top of any config."""
        return [f"{key}={value}" for key, value in self.config_values().items()]

    def apply(self, cfg: Any) -> Any:
        """A copy of `cfg` running this layout."""
        out = copy.deepcopy(cfg)
        for key, value in self.config_values().items():
            section, name = key.split(".")
            setattr(getattr(out, section), name, value)
        return out

    def with_(self, **changes: Any) -> "Layout":
        """This layout with `changes` (validated again)."""
        return replace(self, **changes)

    @property
    def world(self) -> int:
        return self.dp * self.sp * self.pp

    @property
    def virtual(self) -> int:
        """Pipeline stages per pp rank."""
        return self.pp_virtual_stages if self.pp > 1 and self.pp_schedule == "interleaved" else 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in MESH_ORDER)

    def accumulation(self, batch_size: int) -> int:
        """Micro-batches per rank per optimizer step."""
        return batch_size // (self.micro_batch_size * self.dp)

    def pipeline_microbatches(self, batch_size: int) -> int:
        """Micro-batches per schedule run: `parallel.microbatches`, or auto = all of a rank's for one step."""
        per_rank = self.accumulation(batch_size)
        if self.microbatches == "auto":
            return per_rank
        try:
            micro = int(self.microbatches)
        except (TypeError, ValueError):
            raise ConfigError(f"parallel.microbatches={self.microbatches!r} must be a positive integer or "
                              f"auto") from None
        if micro < 1 or per_rank % micro:
            raise ConfigError(
                f"parallel.microbatches={micro} must divide the micro-batches per rank and step, train.batch_size"
                f"({batch_size}) / (train.micro_batch_size({self.micro_batch_size}) * dp({self.dp})) = {per_rank}")
        return micro

    def name(self) -> str:
        """A short label, e.g. "dp2xpp2 fsdp 1f1b mb1"."""
        parts = [f"dp{self.dp}"] + [f"{k}{getattr(self, k)}" for k in ("sp", "ep", "pp") if getattr(self, k) > 1]
        backend = self.dp_backend + (str(self.zero_stage) if self.dp_backend == "zero" else "")
        extra = [backend] if self.dp * self.sp > 1 else []
        if self.pp > 1:
            extra.append(self.pp_schedule + (f"x{self.pp_virtual_stages}" if self.virtual > 1 else ""))
        extra.append(f"mb{self.micro_batch_size}")
        if self.activation_checkpointing:
            extra.append("ac")
        return " ".join(["x".join(parts), *extra])

    def rank_at(self, pp: int = 0, dp: int = 0, sp: int = 0) -> int:
        """The global rank at mesh coordinate (pp, dp, sp): ranks are numbered row-major over `order`."""
        at = {"pp": pp, "dp": dp, "sp": sp}
        rank = 0
        for name in self.order:
            rank = rank * getattr(self, name) + at[name]
        return rank

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's coordinate along each mesh dimension (the inverse of `rank_at`)."""
        out = {}
        for name in reversed(self.order):
            size = getattr(self, name)
            out[name] = rank % size
            rank //= size
        return {name: out[name] for name in MESH_ORDER}

    def rank_grid(self) -> list[list[list[int]]]:
        """Nested lists of global ranks indexed [pp][dp][sp]: the mesh's rank tensor."""
        return [[[self.rank_at(a, b, c) for c in range(self.sp)] for b in range(self.dp)] for a in range(self.pp)]

    def group_ranks(self, dim: str) -> list[int]:
        """Global ranks of rank 0's group along `dim` (pp, dp, sp, dp_sp, ep or edp)."""
        if dim in MESH_ORDER:
            return [self.rank_at(**{dim: i}) for i in range(getattr(self, dim))]
        flat = [self.rank_at(dp=a, sp=b) for a in range(self.dp) for b in range(self.sp)]  # dp_sp, dp-major
        if dim == DATA_DIM:
            return flat
        if dim == EXPERT_DIM:
            return flat[:self.ep]  # ep consecutive ranks of dp x sp
        if dim == EXPERT_DATA_DIM:
            return flat[::self.ep]
        raise ValueError(f"unknown mesh dimension {dim!r}")

    def build_mesh(self, device_type: str) -> ParallelMesh:
        """The named meshes over the default process group (which must exist)."""
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        if self.order == MESH_ORDER:
            mesh = init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_ORDER)
        else:  # the same named dimensions over a permuted rank numbering
            import torch

            mesh = DeviceMesh(device_type, torch.tensor(self.rank_grid()), mesh_dim_names=MESH_ORDER)
        # Gradients and the loss are averaged over every rank that sees different tokens: dp x sp.
        # Flattening creates a process group, so every rank does it here, once, in the same order.
        return ParallelMesh(mesh, mesh["dp", "sp"]._flatten(DATA_DIM))

    def expert_mesh(self, mesh: ParallelMesh) -> "DeviceMesh":
        """The (edp, ep) mesh over dp x sp: experts sharded over ep consecutive ranks (innermost, so
        inside a node), each expert's gradients averaged over edp, the ranks holding the same experts.
        Creates process groups: every rank calls it once, in the same order."""
        return mesh.data._unflatten(0, (self.dp * self.sp // self.ep, self.ep), (EXPERT_DATA_DIM, EXPERT_DIM))
