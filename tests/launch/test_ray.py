"""The Ray controller on a local Ray cluster (loopback only, no dashboard): a killed worker and a hung rank are
detected, named and recovered from keeper memory, bit for bit (DDP; FSDP with experts); a straggler is reported;
failures back to back and during a recovery are survived; too many failures end cleanly, naming the newest
checkpoint; a failed rank's slot gets a warm spare. (A node removed from a 3-node `ray.cluster_utils.Cluster` and
rebuilt from parity: test_ray_cluster.py.)"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from tests.helpers import (CONFIG, assert_bitwise_equal, assert_loopback_only, events, final_checkpoint,
                           load_checkpoint, losses, run_overrides)

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.serial]  # timed failures on a Ray cluster: run alone

STEPS = 10
BASE = [f"train.steps={STEPS}", "train.batch_size=8", "train.micro_batch_size=2", "checkpoint.persist_every=5",
        "fault.heartbeat_s=0.2"]


@pytest.fixture(scope="module")
def local_ray():
    from phalanx.launch.ray_setup import start_local_ray

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    start_local_ray(num_cpus=4, log_to_driver=False)
    assert_loopback_only()
    yield
    ray.shutdown()


@pytest.fixture
def reference(reference_run):
    return reference_run(CONFIG, 2, *BASE)


def controller(tmp_path, *extra: str, workers: int = 2) -> int:
    from phalanx.launch.controller import main

    return main(CONFIG, run_overrides(tmp_path, *BASE, *extra), workers, None)


def of(run_dir, kind):
    return [e for e in events(run_dir) if e["event"] == kind]


def test_a_straggler_is_reported_and_a_hung_rank_named_within_the_timeout_and_recovered(local_ray, reference,
                                                                                          tmp_path):
    timeout = 6.0
    # rank 1 works 4x as long from step 2 on (a straggler: reported, the run goes on), then hangs at step 6
    faults = "fault.inject=[slow:rank=1:step=2:factor=4,hang:rank=1:step=6]"
    assert controller(tmp_path, faults, "fault.straggler_steps=2", f"fault.collective_timeout_s={timeout}") == 0
    run_dir = tmp_path / "t"
    stragglers = of(run_dir, "straggler")
    assert stragglers and {s["rank"] for s in stragglers} == {1}, stragglers
    failure = of(run_dir, "failure")[0]
    injected = next(e for e in of(run_dir, "fault_injected") if e["kind"] == "hang")
    assert failure["cause"] == "hang" and failure["ranks"] == [1], failure
    assert "never entered it: rank 1" in failure["detail"], failure
    assert failure["detected_at"] - injected["time"] <= timeout + 5, (failure, injected)
    assert of(run_dir, "recovery")[0]["restored_from"] == "keeper"
    assert_bitwise_equal(load_checkpoint(final_checkpoint(reference, STEPS)),
                         load_checkpoint(final_checkpoint(run_dir, STEPS)))


def test_exceeding_max_restarts_exits_naming_the_newest_checkpoint(local_ray, tmp_path):
    from phalanx.errors import PhalanxError

    # (A recovery that succeeds before the limit: every other test here.)
    with pytest.raises(PhalanxError, match=r"giving up after fault.max_restarts=0 .*newest usable checkpoint is "
                                           r".*step-5"):
        controller(tmp_path, "fault.max_restarts=0", "fault.inject=[kill:rank=1:step=6]")
    assert of(tmp_path / "t", "gave_up")


# Every kind of state a rank restores from its keeper: DDP's in the tests above (sequence parallelism holds the same
# state), FSDP's and experts' in the back-to-back failures below (ep borrows from dp), a pipeline's in
# tests/checkpoint/test_recovery.py. ZeRO snapshots at persist steps only and restores from storage after a restart
# (a fresh DeepSpeed state does not have the snapshots' layout): test_persistent's ZeRO-2 resume, the same code.
FSDP_EXPERTS = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_dim=64", "parallel.ep=2",
                "parallel.dp_backend=fsdp"]


def test_failures_back_to_back_and_during_a_recovery_are_survived(local_ray, reference_run, tmp_path):
    # rank 1 dies after step 3; rank 0 dies while restoring (the first recovery fails); once recovered, rank 1
    # dies again at step 4, one or two steps after the restored one (step 3 rarely commits before its kill)
    faults = "fault.inject=[kill:rank=1:step=3,kill_restoring:rank=0:step=2,kill:rank=1:step=4]"
    assert controller(tmp_path, *FSDP_EXPERTS, faults, "fault.max_restarts=3") == 0
    reference = reference_run(CONFIG, 2, *BASE, *FSDP_EXPERTS)
    run_dir = tmp_path / "t"
    injected = [(e["spec"], e["rank"]) for e in of(run_dir, "fault_injected")]
    assert injected == [("kill:rank=1:step=3", 1), ("kill_restoring:rank=0:step=2", 0),
                        ("kill:rank=1:step=4", 1)], injected
    assert [(f["cause"], f["ranks"]) for f in of(run_dir, "failure")] == [
        ("dead worker", [1]), ("dead worker", [0]), ("dead worker", [1])]
    recoveries = of(run_dir, "recovery")  # the first recovery never reached a step: it has no event
    assert [(r["ranks"], r["restored_from"]) for r in recoveries] == [([0], "keeper"), ([1], "keeper")], recoveries
    for r in recoveries:
        assert r["cause"] == "dead worker" and r["steps_lost"] <= 2, r
        assert r["downtime_s"] == pytest.approx(r["detect_s"] + r["restart_s"] + r["restore_s"] + r["first_step_s"],
                                                abs=0.05)
    restored = [e["step"] for e in of(run_dir, "restore")]
    assert restored[0] in (2, 3) and 1 <= 4 - restored[0] <= 2, restored  # back to back: the kill at step 4
    assert_bitwise_equal(load_checkpoint(final_checkpoint(reference, STEPS)),
                         load_checkpoint(final_checkpoint(run_dir, STEPS)))
    assert losses(run_dir) == losses(reference)


# Warm spares (phalanx/launch/standby.py): a failed rank's slot gets its node's spare, already warmed, and a
# new spare takes its place; GPU bundles get none.
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
        first = standby.fill([None, None], pg, node_ids, [0, 1])
        assert len(first) == 2 and standby.spares == {}  # no spare slows the workers' start
        standby.replenish(pg, node_ids)  # the attempt trains
        assert list(standby.spares) == [node_ids[0]]  # one node: one spare
        spare = standby.spares[node_ids[0]]
        assert ray.get(spare.warm.remote({"OMP_NUM_THREADS": "1"}), timeout=120) is None  # imports done
        ray.kill(first[1], no_restart=True)

        second = standby.fill([first[0], None], pg, node_ids, [0, 1])
        assert second[0] is first[0]  # a survivor is kept
        assert second[1]._actor_id == spare._actor_id  # the dead rank's slot gets the warm spare
        standby.replenish(pg, node_ids)
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
    gpu_bundles = SimpleNamespace(bundle_specs=[{"GPU": 1, "CPU": 1}] * 2)
    assert standby.fill(survivors, gpu_bundles, ["n", "n"], [0, 1]) == survivors
    standby.replenish(gpu_bundles, ["n", "n"])
    assert standby.spares == {}
