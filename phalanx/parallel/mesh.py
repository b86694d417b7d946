"""Parallel degrees and the device mesh they build.

Mesh dimensions are always (pp, dp, sp). Which of them varies fastest over the global ranks is
`order` (outermost first), by default pp, dp, sp: with ranks numbered node by node the
sequence-parallel group (the heaviest all-to-all traffic) stays inside a node, then data
parallel, then pipeline stages span nodes. `parallel.order: auto` lets the planner choose
(`phalanx/planner/placement.py`), e.g. dp innermost when FSDP's all-gathers outweigh sp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from phalanx.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

MESH_ORDER = ("pp", "dp", "sp")
DATA_DIM = "dp_sp"  # the flattened (dp, sp) dimension: gradient and loss averaging
EXPERT_DIM, EXPERT_DATA_DIM = "ep", "edp"  # dp x sp split as (edp, ep) when ep > 1


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of every parallelism; validates itself against the world size."""

    dp: int
    sp: int
    ep: int
    pp: int
    world_size: int
    order: tuple[str, ...] = MESH_ORDER  # rank order, outermost first: a permutation of MESH_ORDER

    def __post_init__(self) -> None:
        for name in ("dp", "sp", "ep", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{name}={value!r} must be a positive integer")
        product = self.pp * self.dp * self.sp
        if product != self.world_size:
            raise ConfigError(
                f"dp({self.dp}) * sp({self.sp}) * pp({self.pp}) = {product} != WORLD_SIZE({self.world_size}); "
                f"launch {product} processes or change parallel degrees (parallel.dp=auto fills the rest)"
            )
        if sorted(self.order) != sorted(MESH_ORDER):
            raise ConfigError(f"parallel.order={','.join(self.order)} must be a permutation of {','.join(MESH_ORDER)}")
        if (self.dp * self.sp) % self.ep:
            raise ConfigError(
                f"parallel.ep({self.ep}) must divide dp({self.dp}) * sp({self.sp}) = {self.dp * self.sp}"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in MESH_ORDER)

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's coordinate along each mesh dimension (row-major over `order`)."""
        out = {}
        for name in reversed(self.order):
            size = getattr(self, name)
            out[name] = rank % size
            rank //= size
        return {name: out[name] for name in MESH_ORDER}

    def rank_layout(self) -> list:
        """Nested lists of global ranks indexed [pp][dp][sp]: the mesh's rank tensor for `order`."""
        sizes = {name: getattr(self, name) for name in MESH_ORDER}
        grid = [[[0] * sizes["sp"] for _ in range(sizes["dp"])] for _ in range(sizes["pp"])]
        for rank in range(self.world_size):
            c = self.coords(rank)
            grid[c["pp"]][c["dp"]][c["sp"]] = rank
        return grid

    def build_mesh(self, device_type: str) -> "ParallelMesh":
        """The named meshes over the default process group (which must exist)."""
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        if self.order == MESH_ORDER:
            mesh = init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_ORDER)
        else:  # the same named dimensions over a permuted rank numbering
            import torch

            mesh = DeviceMesh(device_type, torch.tensor(self.rank_layout()), mesh_dim_names=MESH_ORDER)
        # Gradients and the loss are averaged over every rank that sees different tokens: dp x sp.
        # Flattening creates a process group, so every rank does it here, once, in the same order.
        return ParallelMesh(mesh, mesh["dp", "sp"]._flatten(DATA_DIM))

    def expert_mesh(self, mesh: "ParallelMesh") -> "DeviceMesh":
        """The (edp, ep) mesh over dp x sp: experts sharded over ep consecutive ranks (innermost, so
        inside a node), each expert's gradients averaged over edp, the ranks holding the same experts.
        Creates process groups: every rank calls it once, in the same order."""
        return mesh.data._unflatten(0, (self.dp * self.sp // self.ep, self.ep), (EXPERT_DATA_DIM, EXPERT_DIM))


@dataclass(frozen=True)
class ParallelMesh:
    """The (pp, dp, sp) mesh and its flattened dp x sp mesh, indexed by dimension name.

    The flattened mesh is kept here rather than sliced back out of the root mesh (which torch
    deprecates), so `mesh["dp_sp"]` and `mesh["sp"]` read alike.
    """

    world: "DeviceMesh"
    data: "DeviceMesh"  # 1-D over DATA_DIM

    def __getitem__(self, name: str) -> "DeviceMesh":
        return self.data if name == DATA_DIM else self.world[name]

    def get_local_rank(self, name: str) -> int:
        return self.data.get_local_rank() if name == DATA_DIM else self.world.get_local_rank(name)
