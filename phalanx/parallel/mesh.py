"""The device mesh's dimension names and the named meshes a `Layout` (`layout.py`) builds.

Mesh dimensions are always (pp, dp, sp), with dp x sp also flattened into one dimension, and split
as (edp, ep) when experts are sharded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

MESH_ORDER = ("pp", "dp", "sp")
DATA_DIM = "dp_sp"  # the flattened (dp, sp) dimension: gradient and loss averaging
EXPERT_DIM, EXPERT_DATA_DIM = "ep", "edp"  # dp x sp split as (edp, ep) when ep > 1


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
