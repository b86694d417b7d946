"""`phalanx ckpt ls|verify|export` on a run trained in this process (one CPU rank)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from phalanx.checkpoint import tools
from phalanx.cli import main
from phalanx.config import load_config
from phalanx.errors import PhalanxError
from phalanx.parallel import validate
from phalanx.parallel.dist import DistContext
from phalanx.trainer import Trainer
from phalanx.trainer.rundir import prepare_run_dir
from tests.helpers import CONFIG, run_overrides

CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def make_trainer(run_root: Path, *extra: str) -> Trainer:
    cfg = validate(load_config(CONFIG, run_overrides(run_root, *extra)))
    run_dir, _ = prepare_run_dir(cfg)
    return Trainer(cfg, CPU, run_dir)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trainer:
    """4 steps, persisted at steps 2 and 4; the trainer keeps its final weights."""
    trainer = make_trainer(tmp_path_factory.mktemp("ckpt"), "train.steps=4", "checkpoint.persist_every=2")
    trainer.fit()
    return trainer


@pytest.fixture
def copy_of_run(trained, tmp_path) -> str:
    """A copy of the trained run that a test may damage (storage defaults to RUN/checkpoints)."""
    target = tmp_path / "run"
    shutil.copytree(trained.run_dir, target, ignore=shutil.ignore_patterns(".keeper-secret"))
    return str(target)


def rows(run_dir: str, tier: str = "storage") -> dict[str, str]:
    """`ckpt ls` lines of one tier by their first cell (the step)."""
    return {line.split()[0]: line for line in tools.list_checkpoints(run_dir).splitlines()[2:] if tier in line}


def test_ls_lists_persisted_steps_as_verified(trained, capsys):
    assert main(["ckpt", "ls", trained.run_dir]) == 0
    out = capsys.readouterr().out
    stored = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isdigit() and " storage " in line}
    assert set(stored) == {"2", "4"}, out
    for cells in stored.values():
        assert cells[-1] == "yes" and cells[-2] == "3", out  # .distcp, rank-0.safetensors, .metadata


def test_export_equals_the_trained_model(trained, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "w.safetensors"
    assert main(["ckpt", "export", trained.run_dir, "--step", "4", "--out", str(out)]) == 0
    exported = load_file(out)
    expected = trained.model.state_dict()
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(exported[key], value), key
    # Refuses to overwrite; --force replaces.
    assert main(["ckpt", "export", trained.run_dir, "--step", "4", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["ckpt", "export", trained.run_dir, "--step", "2", "--out", str(out), "--force"]) == 0
    assert not torch.equal(load_file(out)["output.weight"], expected["output.weight"])  # step 2's weights now


def test_export_default_location_and_format_errors(trained, copy_of_run, capsys):
    assert main(["ckpt", "export", copy_of_run]) == 0  # newest verified step
    assert (Path(copy_of_run) / "export" / "step-4.safetensors").exists()
    assert main(["ckpt", "export", copy_of_run, "--format", "gguf"]) == 2
    assert "gguf" in capsys.readouterr().err
    assert main(["ckpt", "export", copy_of_run, "--step", "3"]) == 2
    err = capsys.readouterr().err
    assert "step-3" in err and "2, 4" in err


def test_a_flipped_byte_fails_verify_naming_the_file(copy_of_run, capsys):
    shard = Path(copy_of_run) / "checkpoints" / "step-4" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    assert main(["ckpt", "verify", copy_of_run]) == 1
    out = capsys.readouterr().out
    assert "step-2: verified" in out and "step-4: FAILED" in out and "__0_0.distcp" in out
    assert main(["ckpt", "verify", copy_of_run, "--step", "2"]) == 0
    listed = rows(copy_of_run)
    assert listed["2"].endswith("yes") and "NO:" in listed["4"] and "__0_0.distcp" in listed["4"]
    with pytest.raises(PhalanxError, match="does not verify"):
        tools.export_checkpoint(copy_of_run, 4)


def test_a_folder_without_manifest_is_listed_incomplete(copy_of_run):
    (Path(copy_of_run) / "checkpoints" / "step-2" / "manifest.json").unlink()
    assert rows(copy_of_run)["2"].endswith("incomplete (no manifest)")
    lines, ok = tools.verify_checkpoints(copy_of_run)
    assert not ok and any("no readable manifest.json" in line for line in lines)


def test_user_errors_name_the_value(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    for args in (["ls", missing], ["verify", missing], ["export", missing, "--step", "1"]):
        assert main(["ckpt", *args]) == 2
        assert missing in capsys.readouterr().err


def test_ls_shows_steps_in_a_live_keeper(tmp_path):
    trainer = make_trainer(tmp_path, "train.steps=4", "checkpoint.persist_every=0")
    try:
        for _ in range(2):
            trainer.train_step(trainer.data.next_step())
            trainer.step += 1
            trainer.snapshots.snapshot(trainer.step)
        trainer.snapshots.finish()
        listed = rows(trainer.run_dir, "keeper")
        block = tools.human_bytes(trainer.snapshots.measured.layout.nbytes)  # the keeper slot of rank 0
        assert "in memory" in listed["2"] and "keeper (node 0)" in listed["2"] and block in listed["2"], listed
        assert "no live keeper" not in tools.list_checkpoints(trainer.run_dir)
    finally:
        trainer.snapshots.close(release=True)
