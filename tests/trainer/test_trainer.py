"""The Trainer: determinism, learning, exact resume in process, interruption, accumulation, schedules, run folders."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from phalanx.config import OptimConfig, load_config
from phalanx.parallel import validate
from phalanx.errors import ConfigError
from phalanx.parallel.dist import DistContext
from phalanx.trainer import Trainer
from phalanx.trainer.optim import lr_factor
from phalanx.trainer.rundir import prepare_run_dir
from tests.helpers import (CONFIG, REPO, assert_bitwise_equal, events, final_checkpoint, load_checkpoint, loopback_env,
                           losses, metrics, phalanx_cmd, run_overrides, run_phalanx, wait_for_step)

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def make_trainer(run_root: Path, *extra: str) -> Trainer:
    cfg = validate(load_config(CONFIG, run_overrides(run_root, *extra)))
    run_dir, _ = prepare_run_dir(cfg)
    return Trainer(cfg, CPU, run_dir)


def test_same_seed_gives_identical_losses(tmp_path):
    a = make_trainer(tmp_path / "a", "train.steps=6")
    a.fit()
    b = make_trainer(tmp_path / "b", "train.steps=6")
    b.fit()
    assert losses(a.run_dir) == losses(b.run_dir) and len(losses(a.run_dir)) == 6
    # another seed, before any step: other initial weights and other batches than seed 0's
    c, d = make_trainer(tmp_path / "c", "run.seed=1"), make_trainer(tmp_path / "d")
    assert not torch.equal(c.data.next_step()[0], d.data.next_step()[0])
    assert any(not torch.equal(p, q) for p, q in zip(c.model.parameters(), d.model.parameters()))


def test_loss_falls_far_below_the_start(tmp_path):
    trainer = make_trainer(tmp_path, "train.steps=40", "optim.lr=0.01", "train.eval_every=20")
    last = trainer.fit()
    first = metrics(trainer.run_dir)[0]
    assert last["loss"] < 0.5 * first["loss"], (first["loss"], last["loss"])
    assert last["val_loss"] < 0.5 * first["loss"]
    assert {"grad_norm", "lr", "tokens_per_s", "tokens_per_s_per_device", "memory_gib"} <= last.keys()
    assert last["mfu"] is None  # no peak FLOPs for a CPU: reported as n/a, not invented


def test_crash_and_resume_is_bitwise_identical_in_process(tmp_path):
    ref = make_trainer(tmp_path / "ref", "train.steps=8", "checkpoint.persist_every=3")
    ref.fit()

    crashing = make_trainer(tmp_path / "crash", "train.steps=8", "checkpoint.persist_every=3")

    def crash(trainer, m):
        if m["step"] == 5:
            raise RuntimeError("simulated crash")

    crashing.hooks.append(crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.fit()
    resumed = make_trainer(tmp_path / "crash", "train.steps=8", "checkpoint.persist_every=3")
    # The crash came while step 5 was logged, before its snapshot: step 4 is the newest in the keeper.
    assert resumed.restore() == 4
    restore = [e for e in events(resumed.run_dir) if e["event"] == "restore"][-1]
    assert restore["restored_from"] == "keeper" and restore["step"] == 4, restore
    resumed.fit()
    assert resumed.step == 8
    assert_bitwise_equal(load_checkpoint(final_checkpoint(ref.run_dir, 8)),
                         load_checkpoint(final_checkpoint(resumed.run_dir, 8)))
    assert losses(ref.run_dir) == losses(resumed.run_dir)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    whole = make_trainer(tmp_path / "whole", "train.steps=5", "train.micro_batch_size=8")
    whole.fit()
    accumulated = make_trainer(tmp_path / "acc", "train.steps=5", "train.micro_batch_size=2")
    accumulated.fit()
    for step, loss in losses(whole.run_dir).items():
        assert losses(accumulated.run_dir)[step] == pytest.approx(loss, rel=1e-5)


def test_activation_checkpointing_recomputes_the_chosen_blocks_and_changes_no_gradient(tmp_path):
    """full: every block; selective: every other one (1, 3). The gradients equal those without it: here in one
    process for every mode; on every parallel layout for full (tests/parallel/harness.py takes each layout's
    step again with it)."""
    from phalanx.models.gpt import Block

    grads = {}
    for mode, recomputed in [("none", []), ("selective", [1, 3]), ("full", [0, 1, 2, 3])]:
        trainer = make_trainer(tmp_path / mode, "model.n_layers=4", f"train.activation_checkpointing={mode}")
        assert [m.index for m in trainer.model.modules() if isinstance(m, Block) and m.recompute] == recomputed
        trainer.forward_backward(trainer.data.next_step())
        grads[mode] = {name: p.grad for name, p in trainer.model.named_parameters()}
    for mode in ("selective", "full"):
        for name, grad in grads["none"].items():
            torch.testing.assert_close(grads[mode][name], grad, rtol=1e-6, atol=0, msg=lambda m: f"{mode} {name}: {m}")
    with pytest.raises(ConfigError, match="activation_checkpointing='partial' is not one of none, full, selective"):
        make_trainer(tmp_path / "bad", "train.activation_checkpointing=partial")


def test_bf16_autocast_trains(tmp_path):
    trainer = make_trainer(tmp_path, "train.steps=3", "train.dtype=bf16")
    last = trainer.fit()
    assert torch.isfinite(torch.tensor(last["loss"]))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_warmup_then_decay(schedule):
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule=schedule, min_lr_ratio=0.1)
    factors = [lr_factor(s, 20, cfg) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0
    if schedule == "constant":
        assert set(factors[4:]) == {1.0}
    else:
        assert factors[20] == pytest.approx(0.1)
        assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    if schedule == "linear":
        assert factors[12] == pytest.approx(0.1 + 0.9 * 0.5)


def test_retention_keeps_the_newest_and_ignores_torn_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path, "train.steps=5", "checkpoint.persist_every=1", "checkpoint.keep_last=2")
    trainer.fit()
    root = Path(trainer.run_dir) / "checkpoints"
    kept = sorted(p.name for p in root.iterdir())  # a step is not persisted while the last write runs
    assert len(kept) == 2 and kept[-1] == "step-5", kept
    torn = root / "step-9"
    torn.mkdir()
    (torn / ".metadata").write_bytes(b"garbage")  # no manifest: never loaded
    (root / "step-7.partial").mkdir()
    store = trainer.snapshots.store
    assert store.latest() == 5
    skipped = []
    assert store.newest_valid(lambda step, problem: skipped.append((step, problem))) == 5
    assert skipped == [(9, "step-9 has no readable manifest.json (an interrupted write): incomplete")]


def test_resume_false_starts_fresh_beside_the_old_run(tmp_path):
    first = make_trainer(tmp_path, "train.steps=2")
    first.fit()
    before = {p: p.read_bytes() for p in Path(first.run_dir).rglob("*") if p.is_file()}
    fresh = make_trainer(tmp_path, "train.steps=2", "run.resume=false")
    assert fresh.run_dir.endswith("t-2") and fresh.restore() is None
    fresh.fit()
    assert {p: p.read_bytes() for p in Path(first.run_dir).rglob("*") if p.is_file()} == before
    assert "name: t-2" in (Path(fresh.run_dir) / "config.yaml").read_text()


def test_resuming_with_a_different_model_is_refused(tmp_path):
    make_trainer(tmp_path, "train.steps=1").fit()
    with pytest.raises(ConfigError, match="model.d_model=64 but the config says 32"):
        make_trainer(tmp_path, "train.steps=1", "model.d_model=32")


def test_changed_config_keeps_the_previous_one(tmp_path):
    make_trainer(tmp_path, "train.steps=1").fit()
    trainer = make_trainer(tmp_path, "train.steps=3")
    kept = [p for p in Path(trainer.run_dir).glob("config-*.yaml")]
    assert len(kept) == 1 and "steps: 1" in kept[0].read_text()
    assert trainer.restore() == 1


@pytest.mark.slow
def test_wandb_offline_run_continues_after_resume(tmp_path):
    first = make_trainer(tmp_path, "train.steps=2", "log.wandb=offline")
    first.fit()
    run_id = first.wandb_run_id
    assert run_id
    again = make_trainer(tmp_path, "train.steps=4", "log.wandb=offline")
    again.fit()
    assert again.wandb_run_id == run_id
    offline_runs = list((Path(first.run_dir) / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline_runs) == 2, offline_runs  # one folder per launch, both of the same wandb run id
    assert "WANDB_MODE" not in os.environ or os.environ["WANDB_MODE"] != "online"


def test_a_second_launch_on_a_busy_run_folder_is_refused_and_sigterm_saves_and_exits_cleanly(tmp_path):
    # (A lock whose process was SIGKILLed is no longer held: the relaunch in tests/checkpoint/test_recovery.py.
    # A launch SIGKILLed at a random step resumes bit for bit: the same test.)
    # (log.every=50: its output waits in a pipe until it ends)
    args = ["train", CONFIG, *run_overrides(tmp_path, "train.steps=100000", "checkpoint.persist_every=0",
                                            "log.every=50")]
    first = subprocess.Popen(phalanx_cmd(args), cwd=REPO, env=loopback_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(tmp_path / "t", 3, first)
        config = (tmp_path / "t" / "config.yaml").read_text()
        second = run_phalanx([*args[:-1], "checkpoint.persist_every=2"], timeout=120)
        assert second.returncode == 2
        assert "is in use by phalanx pid" in second.stderr and str(first.pid) in second.stderr
        assert (tmp_path / "t" / "config.yaml").read_text() == config  # the refused launch changed nothing
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert "stopped by signal" in out
    stopped = [e for e in events(tmp_path / "t") if e["event"] == "interrupted"]
    assert stopped and (final_checkpoint(tmp_path / "t", stopped[0]["step"]) / "manifest.json").exists()
