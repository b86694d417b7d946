"""The Ray controller on a local Ray cluster (loopback, no dashboard): a killed worker and a hung rank
are detected, named and recovered from keeper memory, bit for bit; a lost node of a 4-node cluster is
rebuilt from its erasure group's parity; too many failures end cleanly, naming the newest checkpoint."""

from __future__ import annotations

import os

import pytest

from tests.helpers import (CONFIG, assert_bitwise_equal, events, final_checkpoint, load_checkpoint, losses,
                           run_overrides, run_phalanx)

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

STEPS = 10
BASE = [f"train.steps={STEPS}", "train.batch_size=8", "train.micro_batch_size=2", "checkpoint.persist_every=5",
        "fault.heartbeat_s=0.2"]


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    result = run_phalanx(["train", CONFIG, *run_overrides(root, *BASE)], nproc=2)
    assert result.returncode == 0, result.stderr
    return root / "t"


def controller(tmp_path, *extra: str, workers: int = 2) -> int:
    from phalanx.launch.controller import main

    return main(CONFIG, run_overrides(tmp_path, *BASE, *extra), workers, None)


def of(run_dir, kind):
    return [e for e in events(run_dir) if e["event"] == kind]


def test_two_killed_workers_recover_from_keepers_bit_for_bit(local_ray, reference, tmp_path):
    assert controller(tmp_path, "fault.inject=[kill:rank=1:step=3,kill:rank=0:step=6]") == 0
    run_dir = tmp_path / "t"
    recoveries = of(run_dir, "recovery")
    assert [r["cause"] for r in recoveries] == ["dead worker", "dead worker"], recoveries
    assert [r["ranks"] for r in recoveries] == [[1], [0]]
    for r in recoveries:
        assert r["restored_from"] == "keeper" and r["steps_lost"] <= 1, r
        assert r["downtime_s"] == pytest.approx(r["detect_s"] + r["restart_s"] + r["restore_s"] + r["first_step_s"],
                                                abs=0.05)
    assert_bitwise_equal(load_checkpoint(final_checkpoint(reference, STEPS)),
                         load_checkpoint(final_checkpoint(run_dir, STEPS)))
    assert {s: v for s, v in losses(run_dir).items()} == losses(reference)


def test_a_hung_rank_is_named_within_the_timeout_and_recovered(local_ray, reference, tmp_path):
    timeout = 6.0
    assert controller(tmp_path, "fault.inject=[hang:rank=1:step=4]", f"fault.collective_timeout_s={timeout}") == 0
    run_dir = tmp_path / "t"
    failure, injected = of(run_dir, "failure")[0], of(run_dir, "fault_injected")[0]
    assert failure["cause"] == "hang" and failure["ranks"] == [1], failure
    assert "never entered it: rank 1" in failure["detail"], failure
    assert failure["detected_at"] - injected["time"] <= timeout + 5, (failure, injected)
    assert of(run_dir, "recovery")[0]["restored_from"] == "keeper"
    assert_bitwise_equal(load_checkpoint(final_checkpoint(reference, STEPS)),
                         load_checkpoint(final_checkpoint(run_dir, STEPS)))


def test_exceeding_max_restarts_exits_naming_the_newest_checkpoint(local_ray, tmp_path):
    from phalanx.errors import PhalanxError

    with pytest.raises(PhalanxError, match=r"giving up after fault.max_restarts=1 .*newest usable checkpoint is "
                                           r".*step-5"):
        controller(tmp_path, "fault.max_restarts=1", "fault.inject=[kill:rank=1:step=6,kill:rank=1:step=8]")
    assert of(tmp_path / "t", "gave_up")


def test_a_straggler_is_reported_with_its_rank(local_ray, tmp_path):
    assert controller(tmp_path, "fault.inject=[slow:rank=1:step=2:factor=4]", "fault.straggler_steps=2",
                      "train.steps=8") == 0
    stragglers = of(tmp_path / "t", "straggler")
    assert stragglers and stragglers[0]["rank"] == 1, stragglers
