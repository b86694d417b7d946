"""torchrun over gloo on loopback: loss curves equal one process, and exact resume after SIGKILL.

One curve per data-parallel back end and per parallel kind, each from a shipped config; the one-step parity
tests (tests/parallel) cover every other mix. The curves are trained on pooled local ranks (tests/helpers.train_local: the same code, no torchrun); the
resume tests kill and relaunch under torchrun and compare with those runs bit for bit."""

from __future__ import annotations

import random
import signal
import subprocess

import pytest

from tests.helpers import (REPO, assert_bitwise_equal, final_checkpoint, kill_tree, load_checkpoint, loopback_env,
                           losses, metrics, phalanx_cmd, run_overrides, run_phalanx, wait_for_step)

pytestmark = pytest.mark.slow

STEPS = 16
COMMON = [f"train.steps={STEPS}", "checkpoint.persist_every=2", "train.batch_size=8", "train.micro_batch_size=2"]
ONE_PROCESS = ["parallel.dp=1", "parallel.sp=1", "parallel.ep=1", "parallel.pp=1", "parallel.dp_backend=ddp"]

# layout -> (config, processes, overrides). fp32 on CPU: the ranks sum the same numbers in a different
# order, so losses agree to rounding; 1e-5 relative holds over 16 steps (1e-4 for pipelines).
LAYOUTS = {
    "ddp2": ("tiny.yaml", 2, []),
    "zero2": ("tiny_zero.yaml", 2, []),
    "fsdp2xsp2": ("tiny_fsdp_sp.yaml", 4, []),
    "moe-ep2xdp2": ("tiny_moe_ep.yaml", 4, []),
    "pp2xdp2": ("tiny_pp.yaml", 4, []),
}


def _args(layout: str, run_dir) -> tuple[list[str], int]:
    config, nproc, extra = LAYOUTS[layout]
    return ["train", str(REPO / "configs" / config), *run_overrides(run_dir, *COMMON, *extra)], nproc


def _run(reference_run, layout: str, one: bool = False):
    """A failure-free run of `layout` (or of its model on one process), on pooled local ranks."""
    config, nproc, extra = LAYOUTS[layout]
    config = REPO / "configs" / config
    if one:
        return reference_run(config, 1, *COMMON, *extra, *ONE_PROCESS)
    return reference_run(config, nproc, *COMMON, *extra)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_curve_matches_one_process(layout, reference_run):
    run_dir = _run(reference_run, layout)
    one, got = losses(_run(reference_run, layout, one=True)), losses(run_dir)
    assert sorted(got) == sorted(one) == list(range(1, STEPS + 1))
    rel = 1e-4 if layout.startswith("pp") else 1e-5
    for step, loss in one.items():
        assert got[step] == pytest.approx(loss, rel=rel), f"step {step}: {loss} vs {got[step]}"
    assert one[STEPS] < 0.8 * one[1]  # and it learned something
    last = metrics(run_dir)[-1]
    if layout.startswith("moe"):
        assert last["moe_aux_loss"] > 0.9 and last["moe_imbalance"] >= 1.0 and last["moe_dropped"] == 0.0
        assert last["moe_a2a_bytes"] > 0
    if layout.startswith("pp"):
        assert 0.0 < last["pp_bubble"] < 1.0 and 0.0 < last["pp_bubble_theory"] < 1.0
        assert len(last["pp_busy_s"]) == len(last["pp_idle_s"]) == 2


# ZeRO is left out: one run in four of this test with ZeRO-3 ended 1e-8 away from the uninterrupted
# run (tok_embeddings), while resuming cleanly stopped ZeRO-3 runs from every even step was bitwise
# equal; ZeRO's exact resume is not claimed. DDP's is tested on one process (tests/trainer) and under Ray.
@pytest.mark.parametrize("layout", ["fsdp2xsp2", "pp2xdp2"])
def test_sigkill_at_a_random_step_then_relaunch_is_bitwise_identical(layout, reference_run, tmp_path):
    ref_dir = _run(reference_run, layout)
    kill_at = random.Random().randint(3, STEPS - 6)  # from step 3 on, step-2 is committed; 6 steps of margin
    print(f"killing every process at step {kill_at}")
    args, nproc = _args(layout, tmp_path)
    proc = subprocess.Popen(phalanx_cmd(args, nproc=nproc), cwd=REPO, env=loopback_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(tmp_path / "t", kill_at, proc)
    finally:
        kill_tree(proc)  # torchrun and every rank at once, as when a machine dies
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    relaunch = run_phalanx(args, nproc=nproc)
    assert relaunch.returncode == 0, relaunch.stderr
    assert "resumed" in relaunch.stdout
    assert relaunch.stdout.count("training ") == 1 and relaunch.stdout.count(" | loss ") > 0  # only rank 0 logs
    assert_bitwise_equal(load_checkpoint(final_checkpoint(ref_dir, STEPS)),
                         load_checkpoint(final_checkpoint(tmp_path / "t", STEPS)))
    assert losses(ref_dir) == losses(tmp_path / "t")
