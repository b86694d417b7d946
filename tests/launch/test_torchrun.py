"""torchrun over gloo on loopback: loss curves equal one process, and exact resume after SIGKILL."""

from __future__ import annotations

import random
import signal
import subprocess

import pytest

from tests.helpers import (CONFIG, REPO, assert_bitwise_equal, final_checkpoint, kill_tree, load_checkpoint,
                           loopback_env, losses, metrics, phalanx_cmd, run_overrides, run_phalanx, wait_for_step)

pytestmark = pytest.mark.slow

STEPS = 20
COMMON = [f"train.steps={STEPS}", "checkpoint.persist_every=0", "train.batch_size=8", "train.micro_batch_size=2"]

MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_dim=64"]
PP4 = ["model.n_layers=4"]  # enough blocks for 4 stages

# layout -> (processes, overrides). fp32 on CPU: the ranks sum the same numbers in a different
# order, so losses agree to rounding; 1e-5 relative holds over 20 steps (the issues ask 1e-5 for
# DDP, 1e-4 for the other layouts).
LAYOUTS = {
    "ddp2": (2, []),
    "dp4": (4, ["parallel.dp=4"]),
    "sp2": (2, ["parallel.dp=1", "parallel.sp=2"]),
    "sp4": (4, ["parallel.dp=1", "parallel.sp=4", "model.n_kv_heads=1"]),
    "dp2xsp2": (4, ["parallel.dp=2", "parallel.sp=2"]),
    "fsdp2": (2, ["parallel.dp_backend=fsdp"]),
    "fsdp2xsp2": (4, ["parallel.dp=2", "parallel.sp=2", "parallel.dp_backend=fsdp"]),
    "zero1": (2, ["parallel.dp_backend=zero", "parallel.zero_stage=1"]),
    "zero2": (2, ["parallel.dp_backend=zero", "parallel.zero_stage=2"]),
    "zero3": (2, ["parallel.dp_backend=zero", "parallel.zero_stage=3"]),
    "zero2xsp2": (4, ["parallel.dp=2", "parallel.sp=2", "parallel.dp_backend=zero", "parallel.zero_stage=2"]),
    "moe-ep2xdp2": (4, [*MOE, "parallel.ep=2"]),
    "moe-ep2xsp2-fsdp": (4, [*MOE, "parallel.dp=2", "parallel.sp=2", "parallel.ep=2", "parallel.dp_backend=fsdp"]),
    "moe-zero2": (2, [*MOE, "parallel.dp_backend=zero", "parallel.zero_stage=2"]),
    "pp2-gpipe": (2, [*PP4, "parallel.pp=2", "parallel.pp_schedule=gpipe"]),
    "pp2-1f1b": (2, [*PP4, "parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "pp2-interleaved": (2, [*PP4, "parallel.pp=2", "parallel.pp_schedule=interleaved"]),
    "pp4": (4, [*PP4, "parallel.pp=4"]),
    "pp2xdp2": (4, [*PP4, "parallel.pp=2", "parallel.dp=2"]),
    "pp2xsp2": (4, [*PP4, "parallel.pp=2", "parallel.dp=1", "parallel.sp=2"]),
    "pp2xep2-moe": (4, [*PP4, *MOE, "parallel.pp=2", "parallel.dp=2", "parallel.ep=2"]),
}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """One-process loss curves, one per model shape the layouts use."""
    cache = {}

    def curve(model: tuple[str, ...]) -> dict[int, float]:
        if model not in cache:
            root = tmp_path_factory.mktemp("one")
            result = run_phalanx(["train", CONFIG, *run_overrides(root, *COMMON, *model)])
            assert result.returncode == 0, result.stderr
            cache[model] = losses(root / "t")
        return cache[model]

    return curve


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_curve_matches_one_process(layout, one_process, tmp_path):
    nproc, extra = LAYOUTS[layout]
    one_process = one_process(tuple(o for o in extra if o.startswith("model.")))
    run = run_phalanx(["train", CONFIG, *run_overrides(tmp_path, *COMMON, *extra)], nproc=nproc)
    assert run.returncode == 0, run.stderr
    got = losses(tmp_path / "t")
    assert sorted(got) == sorted(one_process) == list(range(1, STEPS + 1))
    rel = 1e-4 if layout.startswith("pp") else 1e-5  # the pipeline issue asks 1e-4
    for step, loss in one_process.items():
        assert got[step] == pytest.approx(loss, rel=rel), f"step {step}: {loss} vs {got[step]}"
    assert one_process[STEPS] < 0.8 * one_process[1]  # and it learned something
    assert run.stdout.count("training ") == 1 and run.stdout.count(" | loss ") == STEPS  # only rank 0 logs
    if layout.startswith("moe"):
        routing = metrics(tmp_path / "t")[-1]
        assert routing["moe_aux_loss"] > 0.9 and routing["moe_imbalance"] >= 1.0 and routing["moe_dropped"] == 0.0
        assert (routing["moe_a2a_bytes"] > 0) == ("parallel.ep=2" in extra)
    if layout.startswith("pp"):
        last = metrics(tmp_path / "t")[-1]
        assert 0.0 < last["pp_bubble"] < 1.0 and 0.0 < last["pp_bubble_theory"] < 1.0
        assert len(last["pp_busy_s"]) == len(last["pp_idle_s"]) == (4 if layout == "pp4" else 2)


# ZeRO is left out: one run in four of this test with ZeRO-3 ended 1e-8 away from the uninterrupted
# run (tok_embeddings), while resuming cleanly stopped ZeRO-3 runs from every even step was bitwise
# equal; until that is understood, ZeRO's exact resume is not claimed.
@pytest.mark.parametrize("config,nproc,layout", [
    ("configs/tiny.yaml", 2, []),
    ("configs/tiny_dp_sp.yaml", 4, []),
    ("configs/tiny_fsdp_sp.yaml", 4, []),
    ("configs/tiny_moe_ep.yaml", 4, ["train.micro_batch_size=2"]),
    ("configs/tiny_pp.yaml", 4, ["train.micro_batch_size=2"]),
], ids=["ddp2", "dp2xsp2", "fsdp2xsp2", "moe-ep2xdp2", "pp2xdp2"])
def test_sigkill_at_a_random_step_then_relaunch_is_bitwise_identical(config, nproc, layout, tmp_path):
    steps = 16
    extra = [f"train.steps={steps}", "checkpoint.persist_every=2", *layout]
    config = str(REPO / config)
    ref = run_phalanx(["train", config, *run_overrides(tmp_path / "ref", *extra)], nproc=nproc)
    assert ref.returncode == 0, ref.stderr

    kill_at = random.Random().randint(3, steps - 6)  # from step 3 on, step-2 is committed; 6 steps of margin
    print(f"killing every process at step {kill_at}")
    args = ["train", config, *run_overrides(tmp_path / "kill", *extra)]
    proc = subprocess.Popen(phalanx_cmd(args, nproc=nproc), cwd=REPO, env=loopback_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(tmp_path / "kill" / "t", kill_at, proc)
    finally:
        kill_tree(proc)  # torchrun and every rank at once, as when a machine dies
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    relaunch = run_phalanx(args, nproc=nproc)
    assert relaunch.returncode == 0, relaunch.stderr
    assert "resumed" in relaunch.stdout
    ref_dir, kill_dir = tmp_path / "ref" / "t", tmp_path / "kill" / "t"
    assert_bitwise_equal(load_checkpoint(final_checkpoint(ref_dir, steps)), load_checkpoint(final_checkpoint(kill_dir, steps)))
    assert losses(ref_dir) == losses(kill_dir)
