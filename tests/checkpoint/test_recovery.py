"""Recovery under torchrun (gloo, loopback): a killed trainer restores from its keeper, a lost node is
rebuilt from its erasure group's survivors, and both continue bit for bit like a run never killed. (More
lost than parity can rebuild: tests/checkpoint/test_restore_plan.py decides storage; the storage restore
itself runs in test_persistent.py and test_ray.py's ZeRO recovery.)"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from phalanx.checkpoint.keeper import discovery_file
from phalanx.checkpoint.link import default_keeper_dir, run_identity
from tests.helpers import (CONFIG, REPO, assert_bitwise_equal, events, final_checkpoint, kill_tree, load_checkpoint,
                           loopback_env, losses, phalanx_cmd, run_overrides, run_phalanx, wait_for_step)

pytestmark = pytest.mark.slow

STEPS = 40  # long enough that the kill lands mid-run on a loaded machine (steps take ~0.1 s)
BASE = [f"train.steps={STEPS}", "checkpoint.persist_every=5", "train.batch_size=8", "train.micro_batch_size=2"]


def keeper_pid(run_dir: Path, node: int) -> int:
    run_id, _ = run_identity(str(run_dir))
    with open(discovery_file(default_keeper_dir(), run_id, node)) as f:
        return json.load(f)["pid"]


def sigkill(pid: int) -> None:
    proc = psutil.Process(pid)
    proc.kill()
    proc.wait(timeout=30)


def held_steps(run_dir: Path) -> dict[int, set[int]]:
    """rank -> the steps its keeper holds complete, asked of every keeper of the run on this machine."""
    from phalanx.checkpoint.link import read_discovery
    from phalanx.checkpoint.wire import KeeperClient, WireError

    run_id, secret = run_identity(str(run_dir))
    held: dict[int, set[int]] = {}
    for path in glob.glob(os.path.join(default_keeper_dir(), run_id, "node-*.json")):
        info = read_discovery(path)
        if info is None:
            continue
        try:
            client = KeeperClient(info["host"], info["port"], secret, timeout=5)
            inventory = client.call("inventory")[0]
            client.close()
        except WireError:
            continue
        for rank, entry in inventory["data"].items():
            held.setdefault(int(rank), set()).update(step for step, _slot in entry["steps"])
    return held


def wait_for_snapshots(run_dir: Path, world: int, launcher: subprocess.Popen) -> None:
    """Until every rank's keeper holds two same steps: the older one's parity was sent by every rank (a rank
    snapshots step s+1 only after its step s job, parity and commit included, ended), so a kill from now on
    can be checked against a restore from memory."""
    deadline = time.monotonic() + 120
    while True:
        held = held_steps(run_dir)
        if len(set.intersection(*(held.get(r, set()) for r in range(world)))) >= 2:
            return
        assert time.monotonic() < deadline and launcher.poll() is None, f"no two snapshots on all ranks: {held}"
        time.sleep(0.05)


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the trainer processes under a torchrun launcher (from their environment)."""
    out = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if "RANK" in env and "phalanx" in " ".join(child.cmdline()):
            out[int(env["RANK"])] = child.pid
    return out


@pytest.fixture
def reference(reference_run):
    """Uninterrupted runs, one per (processes, overrides)."""
    return lambda nproc, *extra: reference_run(CONFIG, nproc, *BASE, *extra)


def assert_same_run(ref_dir: Path, run_dir: Path) -> None:
    assert_bitwise_equal(load_checkpoint(final_checkpoint(ref_dir, STEPS)), load_checkpoint(final_checkpoint(run_dir, STEPS)))
    assert losses(ref_dir) == losses(run_dir)


def test_sigkill_one_trainer_mid_step_restores_from_its_keeper(reference, tmp_path):
    rng = random.Random()
    # A kill is made only where a restore can be checked: after two snapshots are in the keepers (a kill at step 2
    # could land before the first snapshot completed, and the relaunch would rightly start fresh).
    kill_at, delay, victim = rng.randint(3, STEPS - 25), rng.uniform(0.0, 0.3), rng.randint(0, 1)
    print(f"SIGKILL rank {victim} {delay:.3f}s after step {kill_at} was logged")
    ref = reference(2)
    args = ["train", CONFIG, *run_overrides(tmp_path, *BASE)]
    launcher = subprocess.Popen(phalanx_cmd(args, nproc=2), cwd=REPO, env=loopback_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(tmp_path / "t", kill_at, launcher)
        wait_for_snapshots(tmp_path / "t", 2, launcher)
        time.sleep(delay)  # somewhere inside the next step
        os.kill(rank_pids(launcher)[victim], signal.SIGKILL)
        launcher.wait(timeout=120)  # torchrun stops the other rank and fails
    finally:
        kill_tree(launcher)
    assert launcher.returncode != 0, "the run finished before the kill"
    relaunch = run_phalanx(args, nproc=2)
    assert relaunch.returncode == 0, relaunch.stderr
    restore = [e for e in events(tmp_path / "t") if e["event"] == "restore"]
    assert restore and restore[-1]["restored_from"] == "keeper", restore
    assert restore[-1]["step"] >= kill_at - 1, restore  # step kill_at was logged before its snapshot: at most it is lost
    assert_same_run(ref, tmp_path / "t")


def test_node_loss_is_rebuilt_from_parity(reference, tmp_path):
    """4 ranks on 4 simulated nodes, k=2, m=1: groups {0,1} (parity on node 2) and {2,3} (parity on
    node 0). Node 1 dies — its keeper and its trainer — and every other trainer with it."""
    nodes = ["checkpoint.simulate_nodes=4", "checkpoint.erasure_k=2", "checkpoint.erasure_m=1"]
    ref = reference(4, *nodes)
    args = ["train", CONFIG, *run_overrides(tmp_path, *BASE, *nodes)]
    launcher = subprocess.Popen(phalanx_cmd(args, nproc=4), cwd=REPO, env=loopback_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_at = random.Random().randint(3, STEPS - 25)  # as above: the kill waits for snapshots it can check
    print(f"node 1 lost after step {kill_at}")
    try:
        wait_for_step(tmp_path / "t", kill_at, launcher)
        wait_for_snapshots(tmp_path / "t", 4, launcher)
        lost_keeper = keeper_pid(tmp_path / "t", 1)
    finally:
        kill_tree(launcher)
    sigkill(lost_keeper)
    relaunch = run_phalanx(args, nproc=4)
    assert relaunch.returncode == 0, relaunch.stderr
    restore = [e for e in events(tmp_path / "t") if e["event"] == "restore"][-1]
    assert restore["restored_from"] == "peers" and restore["step"] >= kill_at - 1, restore
    assert restore["ranks"] == ["keeper", "peers (erasure decode)", "keeper", "keeper"], restore
    assert_same_run(ref, tmp_path / "t")
