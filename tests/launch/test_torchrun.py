"""torchrun DDP over gloo on loopback: parity with one process, and exact resume after SIGKILL."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess

import pytest

from tests.helpers import (CONFIG, REPO, assert_bitwise_equal, final_checkpoint, load_checkpoint, loopback_env,
                           losses, phalanx_cmd, run_overrides, run_phalanx, wait_for_step)

pytestmark = pytest.mark.slow


def test_ddp_two_ranks_matches_one_process(tmp_path):
    steps = 20
    common = [f"train.steps={steps}", "checkpoint.persist_every=0", "train.batch_size=8", "train.micro_batch_size=2"]
    single = run_phalanx(["train", CONFIG, *run_overrides(tmp_path / "one", *common)])
    assert single.returncode == 0, single.stderr
    ddp = run_phalanx(["train", CONFIG, *run_overrides(tmp_path / "ddp", *common)], nproc=2)
    assert ddp.returncode == 0, ddp.stderr
    one, two = losses(tmp_path / "one" / "t"), losses(tmp_path / "ddp" / "t")
    assert sorted(one) == sorted(two) == list(range(1, steps + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), f"step {step}: {one[step]} vs {two[step]}"
    assert one[steps] < 0.8 * one[1]  # and it learned something
    assert ddp.stdout.count("training ") == 1 and ddp.stdout.count(" | loss ") == steps  # only rank 0 logs


def test_ddp_sigkill_at_a_random_step_then_relaunch_is_bitwise_identical(tmp_path):
    steps = 10
    extra = [f"train.steps={steps}", "checkpoint.persist_every=2"]
    ref = run_phalanx(["train", CONFIG, *run_overrides(tmp_path / "ref", *extra)], nproc=2)
    assert ref.returncode == 0, ref.stderr

    kill_at = random.Random().randint(3, steps - 2)  # from step 3 on, step-2 is committed
    print(f"killing every process at step {kill_at}")
    args = ["train", CONFIG, *run_overrides(tmp_path / "kill", *extra)]
    # A new session: SIGKILL reaches torchrun and both ranks at once, as when a machine dies.
    proc = subprocess.Popen(phalanx_cmd(args, nproc=2), cwd=REPO, env=loopback_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(tmp_path / "kill" / "t", kill_at, proc)
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already if it finished first
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    relaunch = run_phalanx(args, nproc=2)
    assert relaunch.returncode == 0, relaunch.stderr
    ref_dir, kill_dir = tmp_path / "ref" / "t", tmp_path / "kill" / "t"
    assert_bitwise_equal(load_checkpoint(final_checkpoint(ref_dir, steps)), load_checkpoint(final_checkpoint(kill_dir, steps)))
    assert losses(ref_dir) == losses(kill_dir)
