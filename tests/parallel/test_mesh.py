"""Layout: validation quoting the numbers, rank order, and the groups it builds."""

from __future__ import annotations

import pytest

from phalanx.errors import ConfigError
from phalanx.parallel.layout import Layout
from tests.parallel.harness import spawn


def test_rank_order_keeps_sp_innermost():
    dims = Layout(dp=2, sp=2, ep=1, pp=2, world_size=8)
    assert [dims.coords(r) for r in (0, 1, 2, 5)] == [
        {"pp": 0, "dp": 0, "sp": 0}, {"pp": 0, "dp": 0, "sp": 1}, {"pp": 0, "dp": 1, "sp": 0},
        {"pp": 1, "dp": 0, "sp": 1}]


@pytest.mark.parametrize("kwargs,message", [
    ({"dp": 2, "sp": 2, "ep": 1, "pp": 2, "world_size": 4}, "dp(2) * sp(2) * pp(2) = 8 != WORLD_SIZE(4)"),
    ({"dp": 2, "sp": 1, "ep": 4, "pp": 1, "world_size": 2}, "parallel.ep(4) must divide dp(2) * sp(1) = 2"),
    ({"dp": 0, "sp": 1, "ep": 1, "pp": 1, "world_size": 1}, "parallel.dp=0 must be a positive integer"),
])
def test_impossible_degrees_are_refused_with_numbers(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        Layout(**kwargs)


def _groups(dp: int, sp: int, ep: int) -> dict:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        dims = Layout(dp=dp, sp=sp, ep=ep, pp=1, world_size=dist.get_world_size())
        mesh = dims.build_mesh("cpu")
        experts = dims.expert_mesh(mesh)
        out = {name: dist.get_process_group_ranks(mesh[name].get_group()) for name in ("dp", "sp", "dp_sp")}
        out.update({name: dist.get_process_group_ranks(experts[name].get_group()) for name in ("ep", "edp")})
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, out)
        return gathered
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_mesh_groups_for_dp2_sp2_ep2():
    groups = spawn(_groups, 4, 2, 2, 2)
    assert [g["sp"] for g in groups] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [g["dp"] for g in groups] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(g["dp_sp"] == [0, 1, 2, 3] for g in groups)
    assert [g["ep"] for g in groups] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [g["edp"] for g in groups] == [[0, 2], [1, 3], [0, 2], [1, 3]]
