"""The persistent tier: corruption is detected and skipped, a write that fails at the end says where and keeps
the step in memory, a SIGKILL mid-write never leaves a checkpoint that looks valid, and a ZeRO-2 run resumes from
storage bit for bit. (Resumes at other layouts, and plain DCP loading a checkpoint: test_reshard.py.)"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from phalanx.checkpoint.persistent import CheckpointStore
from phalanx.errors import PhalanxError
from tests.checkpoint.test_recovery import keeper_pid
from tests.trainer.test_trainer import make_trainer
from tests.helpers import (CONFIG, REPO, assert_bitwise_equal, events, final_checkpoint, kill_tree, load_checkpoint,
                           loopback_env, losses, phalanx_cmd, run_overrides, train_local, wait_for_step)
from tests.parallel.test_loss_curves import COMMON, STEPS as CURVE_STEPS, ZERO2, shared


def copy_back(run_dir: Path, copy: Path, step: int) -> int:
    """A copy of a finished run folder without its checkpoints after the newest kept one at or before `step`,
    whose step is returned. Keepers belong to a run folder's path: the copy has none, and resumes from storage."""
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("*.pt-export"))
    kept = CheckpointStore(str(copy / "checkpoints")).committed_steps()
    back = max((s for s in kept if s <= step), default=None)
    assert back is not None and back < kept[-1], f"{run_dir} kept {kept}: nothing at or before {step} to resume from"
    for newer in (s for s in kept if s > back):
        shutil.rmtree(final_checkpoint(copy, newer))
    return back


def test_a_flipped_byte_is_detected_and_the_previous_checkpoint_used(tmp_path):
    first = make_trainer(tmp_path, "train.steps=6", "checkpoint.persist_every=2")
    first.fit()  # persists every 2 steps (one is skipped while the last write runs) and step 6 at the end
    root = Path(first.run_dir) / "checkpoints"
    store = CheckpointStore(str(root))
    *_, previous, newest = store.committed_steps()
    assert newest == 6
    try:  # the keeper may still be winding down: memory gone, only storage remains
        psutil.Process(keeper_pid(Path(first.run_dir), 0)).kill()
    except (OSError, psutil.Error):
        pass
    shard = root / "step-6" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert store.verify(previous) == [] and any("__0_0.distcp" in p for p in store.verify(6))

    resumed = make_trainer(tmp_path, "train.steps=8", "checkpoint.persist_every=2")
    with pytest.warns(UserWarning, match="step-6 skipped"):
        assert resumed.restore() == previous
    skipped = [e for e in events(resumed.run_dir) if e["event"] == "checkpoint_skipped"]
    assert skipped[-1]["step"] == 6 and str(shard) in skipped[-1]["problem"], skipped
    restore = [e for e in events(resumed.run_dir) if e["event"] == "restore"][-1]
    assert restore["restored_from"] == "storage" and restore["step"] == previous, restore
    resumed.snapshots.close(release=True)


def test_a_failed_write_at_the_end_names_the_rank_and_the_storage_and_the_keeper_keeps_the_step(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    storage = tmp_path / "a-file" / "checkpoints"
    trainer = make_trainer(tmp_path, "train.steps=2", f"checkpoint.storage={storage}")
    with pytest.raises(PhalanxError, match=rf"persisting step 2 to checkpoint.storage={storage} failed \(rank 0: "
                                           r"NotADirectoryError.*the step is still in the keepers' memory"):
        trainer.fit()
    relaunched = make_trainer(tmp_path, "train.steps=2", f"checkpoint.storage={tmp_path / 'checkpoints'}")
    assert relaunched.restore() == 2
    assert [e for e in events(relaunched.run_dir) if e["event"] == "restore"][-1]["restored_from"] == "keeper"
    relaunched.snapshots.close(release=True)


def test_sigkill_during_persistence_never_leaves_a_valid_looking_torn_checkpoint(tmp_path):
    """Persist every step with a model whose write takes a while; once one checkpoint is complete, SIGKILL the
    keeper (the writer) and the trainer at a random moment, most likely mid-write. Every folder with a manifest
    verifies and loads; every other one is reported incomplete. (A relaunch past a torn step:
    tests/trainer/test_trainer.py's retention test and tests/checkpoint/test_s3.py.)"""
    extra = ["train.steps=400", "checkpoint.persist_every=1", "checkpoint.keep_last=0", "model.d_model=256",
             "model.n_layers=4", "model.max_seq_len=64"]
    args = ["train", CONFIG, *run_overrides(tmp_path, *extra)]
    run_dir = tmp_path / "t"
    launcher = subprocess.Popen(phalanx_cmd(args), cwd=REPO, env=loopback_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        wait_for_step(run_dir, 3, launcher)
        store = CheckpointStore(str(run_dir / "checkpoints"))
        deadline = time.monotonic() + 120
        while not store.committed_steps() and time.monotonic() < deadline:
            time.sleep(0.05)  # one checkpoint completes; then the kill lands mid-write
        time.sleep(random.Random().uniform(0.0, 0.4))
        keeper = psutil.Process(keeper_pid(run_dir, 0))
        keeper.kill()  # the writer dies mid-write, most likely
    finally:
        kill_tree(launcher)
    keeper.wait(timeout=30)
    store = CheckpointStore(str(run_dir / "checkpoints"))
    complete, torn = store.committed_steps(), [s for s in store.step_dirs() if store.manifest(s) is None]
    print(f"complete: {complete}, torn: {torn}")
    assert complete, "no checkpoint was ever completed"
    for step in complete:
        assert store.verify(step) == [], step
        load_checkpoint(final_checkpoint(run_dir, step))  # loads with DCP
    for step in torn:
        assert store.verify(step) == [f"step-{step} has no readable manifest.json (an interrupted write): incomplete"]


CURVE = [*COMMON, *ZERO2]  # test_loss_curves' zero2 run


@pytest.mark.slow
@shared("zero2")
def test_a_zero2_run_resumes_from_storage_bit_for_bit(reference_run, tmp_path):
    """A ZeRO-2 run (DeepSpeed's state, restored from storage: its snapshots are taken at persist steps only)
    resumes from a kept checkpoint and ends as the uninterrupted run did. The run under test is a copy of the
    test_loss_curves zero2 run back at its checkpoint of step 12."""
    config = REPO / "configs" / "tiny_zero.yaml"
    ref = reference_run(config, 2, *CURVE)
    run_dir = tmp_path / "run" / "t"
    resumed = copy_back(ref, run_dir, 12)
    train_local(config, run_overrides(tmp_path / "run", *CURVE), 2)
    restore = [e for e in events(run_dir) if e["event"] == "restore"][-1]
    assert restore["restored_from"] == "storage" and restore["step"] == resumed, restore
    assert_bitwise_equal(load_checkpoint(final_checkpoint(ref, CURVE_STEPS), rank_local=False),
                         load_checkpoint(final_checkpoint(run_dir, CURVE_STEPS), rank_local=False))
    assert losses(run_dir) == losses(ref)


def test_storage_behind_another_protocol_is_loaded_through_it_and_an_unknown_one_is_one_line(tmp_path):
    """checkpoint.storage on a non-local fsspec protocol (fsspec's in-process memory filesystem here): a run that
    persists at its end, resumed by another run folder on the same storage (no keepers of its own, so from
    storage), loads its state through that protocol — the DCP reader once got the path without it and read
    the local disk. An unknown protocol, or a driver not installed, is one line naming what to install."""
    import torch

    from phalanx.errors import ConfigError

    common = ["train.steps=4", "checkpoint.persist_every=0", "checkpoint.sign=false",
              "checkpoint.storage=memory://phalanx-test/ckpt"]
    first = make_trainer(tmp_path / "a", *common)
    first.fit()
    saved = {name: value.clone() for name, value in first.model.state_dict().items()}
    second = make_trainer(tmp_path / "b", *common)
    assert second.restore() == 4
    restore = [e for e in events(tmp_path / "b" / "t") if e["event"] == "restore"][-1]
    assert restore["restored_from"] == "storage", restore
    for name, value in second.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    # gs:// needs gcsfs, which the dev extra leaves out (s3fs is in it, for tests/checkpoint/test_s3.py)
    for storage, words in [("nosuchproto://x", "Protocol not known: nosuchproto"), ("gs://bucket/run", "gcsfs")]:
        with pytest.raises(ConfigError, match=f"checkpoint.storage='{storage}': .*{words}.*install the fsspec"):
            make_trainer(tmp_path / "c", f"checkpoint.storage={storage}")
