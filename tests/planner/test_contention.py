"""The cost model's terms for ranks that share cores, the copies around collectives and FSDP's fixed costs
(pure functions; what the calibration measures is checked in test_plan's calibrate test)."""

from __future__ import annotations

import json

import pytest

from phalanx.config import load_config
from phalanx.parallel import validate
from phalanx.parallel.layout import Layout
from phalanx.parallel.pipeline_schedule import theoretical_bubble
from phalanx.planner.contention import pipeline_slots, pipeline_time, slowdown
from phalanx.planner.cost import cpu_comm_costs, sharded_tensors, step_cost
from phalanx.planner.topology import Link, Topology, preset
from phalanx.planner.traffic import step_traffic
from tests.helpers import CONFIG, TINY


def test_slowdown_reads_the_measured_factors_and_extrapolates_by_share_of_cores() -> None:
    assert slowdown((), 8) == 1.0  # devices of their own
    measured = (1.0, 1.1, 1.6, 2.2)
    assert [slowdown(measured, j) for j in (1, 2, 3, 4)] == [1.0, 1.1, 1.6, 2.2]
    assert slowdown(measured, 8) == pytest.approx(4.4)  # twice the ranks on the same cores
    assert slowdown((1.0, 0.9), 2) == 1.0  # noise never makes sharing faster than owning


def test_pipeline_slots_ramp_up_and_down() -> None:
    assert pipeline_slots(2, 2) == [1, 2, 1]
    assert pipeline_slots(4, 2) == [1, 2, 2, 2, 1]
    assert pipeline_slots(2, 4, virtual=2) == [1, 2, 2, 2, 2, 2, 2, 2, 1]
    assert sum(pipeline_slots(4, 8)) == 4 * 8  # every stage runs every micro-batch once


@pytest.mark.parametrize("pp,m,v", [(2, 2, 1), (4, 8, 1), (4, 4, 2)])
def test_pipeline_time_without_contention_is_the_classic_bubble(pp: int, m: int, v: int) -> None:
    work = 0.25
    assert pipeline_time(work, pp, m, v, 1, (), 8) == pytest.approx(m * work / (1 - theoretical_bubble(pp, m, v)))


def test_shared_cores_make_the_bubble_cheaper() -> None:
    cores2 = (1.0, 1.0, 1.5, 2.0)  # two cores: a third and a fourth busy rank share them
    work, m = 0.1, 2
    # pp2 x dp2 on 4 ranks: the ramps keep 2 ranks busy (full speed), the steady slot 4 (half speed)
    assert pipeline_time(work, 2, m, 1, 2, cores2, 4) == pytest.approx(work * (1 + 2 + 1))
    # dp4 computes the same work at 4 ranks' contention the whole time: m * 2 micro-batch slots
    dp4 = 2 * m * work * slowdown(cores2, 4)
    assert pipeline_time(work, 2, m, 1, 2, cores2, 4) < dp4 / (1 - theoretical_bubble(2, m)) * 0.75


def tiny(world: int, *overrides: str):
    return validate(load_config(CONFIG, [*TINY, "model.n_layers=4", "train.batch_size=8", "train.micro_batch_size=2",
                                         *overrides]), world)


def cpu_topology(**changes) -> Topology:
    base = preset("cpu", nodes=1, gpus_per_node=4)
    fields = dict(copy=Link(1e9, 1e-5), fsdp_call_s=2e-3, fsdp_param_s=1e-4, contention=(1.0, 1.0, 1.5, 2.0))
    fields.update(changes)
    return Topology(**{**base.__dict__, **fields})


def test_ulysses_copies_are_two_copies_of_the_all_to_all_bytes() -> None:
    cfg = tiny(4, "parallel.sp=2")
    lay = Layout.from_config(cfg)
    flows = step_traffic(cfg, lay)
    a2a = flows["all_to_all/sp"]
    costs = cpu_comm_costs({0: flows}, lay, cpu_topology())
    assert costs["copies/sp"] == pytest.approx(2 * a2a.bytes / 1e9 + 4 * a2a.calls * 1e-5)
    assert "fsdp/dp_sp" not in costs  # ddp


def test_fsdp_fixed_cost_per_call_and_per_sharded_parameter() -> None:
    cfg = tiny(4, "parallel.dp_backend=fsdp")
    lay = Layout.from_config(cfg)
    flows = step_traffic(cfg, lay)
    calls = flows["all_gather/dp_sp"].calls + flows["reduce_scatter/dp_sp"].calls
    copied = flows["all_gather/dp_sp"].bytes * 4 + flows["reduce_scatter/dp_sp"].bytes
    costs = cpu_comm_costs({0: flows}, lay, cpu_topology())
    assert costs["fsdp/dp_sp"] == pytest.approx(calls * (2e-3 + 1e-5) + copied / 1e9)
    n_params = sum(1 for _ in __import__("phalanx.models", fromlist=["build_on_meta"]).build_on_meta(cfg.model)
                   .parameters())
    assert sharded_tensors(cfg, lay) == n_params
    assert sharded_tensors(cfg, lay.with_(dp_backend="ddp")) == 0
    with_params = step_cost(cfg, lay, cpu_topology()).optimizer_s
    assert with_params - step_cost(cfg, lay, cpu_topology(fsdp_param_s=0.0)).optimizer_s == pytest.approx(n_params * 1e-4)


def test_contention_slows_every_rank_computing_at_once() -> None:
    cfg = tiny(4)
    lay = Layout.from_config(cfg)
    shared = step_cost(cfg, lay, cpu_topology())
    owned = step_cost(cfg, lay, cpu_topology(contention=()))
    assert shared.compute_s == pytest.approx(2.0 * owned.compute_s)


def test_topology_round_trips_the_new_terms_and_reads_old_files() -> None:
    topo = cpu_topology()
    again = Topology.from_dict(json.loads(topo.to_json()))
    assert again == topo
    old = json.loads(topo.to_json())
    for key in ("contention", "copy", "fsdp_call_s", "fsdp_param_s"):
        old.pop(key)
    old["idle_speedup"] = 1.3  # a field older calibrations wrote
    assert Topology.from_dict(old).contention == ()


def test_pipeline_time_walks_the_slots_only_where_cores_are_shared() -> None:
    # measured factors of 1.0: the slot walk, which must agree with the closed form used without contention
    assert pipeline_time(0.2, 4, 6, 2, 2, (1.0,) * 8, 8) == pytest.approx(pipeline_time(0.2, 4, 6, 2, 2, (), 8))


def test_link_fit_keeps_the_measured_latency_and_fits_the_bandwidth() -> None:
    from phalanx.planner.calibrate import _fit_link

    lat, bw = 300e-6, 1e9
    samples = [(h, v, lat * h + v / bw) for h in (1, 3) for v in (4e3, 64e3, 512e3, 4e6)]
    samples[-1] = (3, 4e6, 3 * lat + 4e6 / bw * 1.5)  # a disturbed big message moves the bandwidth, not the latency
    link = _fit_link(samples, latency=lat)
    assert link.latency_s == lat
    assert 0.5e9 < link.bandwidth < bw
    exact = _fit_link([(1, v, 2e-5 + v / 5e9) for v in (1e5, 1e6, 4e6)])
    assert exact.latency_s == pytest.approx(2e-5) and exact.bandwidth == pytest.approx(5e9)
