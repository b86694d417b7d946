"""Warm spares (`phalanx/launch/standby.py`) on a local Ray cluster on loopback: a failed rank's slot gets
its node's spare, already warmed, and a new spare takes its place; GPU bundles get none."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    from phalanx.launch.controller import start_local_ray

    start_local_ray(num_cpus=4, log_to_driver=False)  # binds and advertises 127.0.0.1 only
    yield
    ray.shutdown()


def test_a_failed_ranks_slot_gets_the_warm_spare_and_a_new_spare_warms(local_ray):
    from ray.util.placement_group import placement_group, placement_group_table

    from phalanx.launch.standby import Standby

    pg = placement_group([{"CPU": 1}, {"CPU": 1}])
    ray.get(pg.ready(), timeout=60)
    node_ids = [placement_group_table(pg)["bundles_to_node_id"][i] for i in range(2)]
    standby = Standby()
    first: list = []
    second: list = []
    try:
        first = standby.fill([None, None], pg, node_ids)
        assert len(first) == 2 and list(standby.spares) == [node_ids[0]]  # one node: one spare
        spare = standby.spares[node_ids[0]]
        assert ray.get(spare.warm.remote({"OMP_NUM_THREADS": "1"}), timeout=120) is None  # imports done
        ray.kill(first[1], no_restart=True)

        second = standby.fill([first[0], None], pg, node_ids)
        assert second[0] is first[0]  # a survivor is kept
        assert second[1]._actor_id == spare._actor_id  # the dead rank's slot gets the warm spare
        replacement = standby.spares[node_ids[0]]
        assert replacement._actor_id != spare._actor_id  # and a new one warms for the next failure
        assert ray.get(replacement.where.remote(), timeout=60)[0] == node_ids[0]
    finally:
        standby.close()
        for worker in [*first, *second[1:]]:
            ray.kill(worker, no_restart=True)
        ray.util.remove_placement_group(pg)


def test_gpu_bundles_get_no_spare(local_ray):
    from phalanx.launch.standby import Standby

    standby = Standby()
    survivors = [object(), object()]  # no slot to fill: only the spare policy is exercised
    assert standby.fill(survivors, SimpleNamespace(bundle_specs=[{"GPU": 1, "CPU": 1}] * 2), ["n", "n"]) == survivors
    assert standby.spares == {}
