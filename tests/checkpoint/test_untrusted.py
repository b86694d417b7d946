"""Untrusted bytes from storage: a planted `.metadata` runs nothing and is refused naming the file, a
shard rewritten together with its manifest digest is refused when signing is on, an unsigned checkpoint
is adopted only on request, and fuzzed files of every stored kind end in a refusal or a verified load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from phalanx.checkpoint import tools
from phalanx.checkpoint.persistent import CheckpointStore
from phalanx.checkpoint.signing import signing_key
from phalanx.checkpoint.untrusted import CheckpointRefused
from phalanx.errors import PhalanxError
from tests.checkpoint.stored import calling, equal_states, load, patching_a_class, rewrite, state_at, write_steps
from tests.helpers import REPO, events, loopback_env

SECRET = bytes(range(32))


def attacks(marker: Path) -> dict[str, bytes]:
    command = f"touch {marker}"
    return {
        "os.system under a DCP module prefix": calling("torch.distributed.checkpoint.filesystem", "os.system", command),
        "builtins.eval": calling("builtins", "eval", f"__import__('os').system({command!r})"),
        "posix.system": calling("posix", "system", command),
        "a DCP class's dotted attribute path": calling("torch.distributed.checkpoint.metadata",
                                                       "Metadata.__init__.__globals__", "os"),
        "torch.load inside a REDUCE": calling("torch", "load", str(marker)),
        "BUILD onto a DCP class": patching_a_class(),
    }


@pytest.mark.parametrize("attack", list(attacks(Path("x"))))
def test_a_planted_metadata_runs_nothing_and_is_refused_naming_the_file(attack, tmp_path):
    store = write_steps(tmp_path / "ckpt")  # unsigned: the metadata reader alone must refuse it
    marker = tmp_path / "ran"
    rewrite(tmp_path / "ckpt" / "step-2", ".metadata", attacks(marker)[attack])
    problems = store.verify(2)
    assert len(problems) == 1 and "step-2/.metadata" in problems[0] and "refused" in problems[0], problems
    assert "\n" not in problems[0]
    skipped: list[int] = []
    assert store.newest_valid(lambda step, problem: skipped.append(step)) == 1 and skipped == [2]
    with pytest.raises(CheckpointRefused, match=r"step-2/\.metadata"):
        load(store, 2)
    assert equal_states(load(store, 1)["model"], state_at(1)["model"])
    assert not marker.exists()
    from torch.distributed.checkpoint.metadata import Metadata

    assert Metadata.__init__.__qualname__ == "Metadata.__init__"  # no class was patched


def test_resume_falls_back_past_a_planted_metadata_and_says_why(tmp_path):
    """The trainer's own restore, unsigned run: the planted step is skipped with an event naming the
    file, the previous verified step is restored, the command never runs."""
    from tests.checkpoint.test_recovery import keeper_pid
    from tests.trainer.test_trainer import make_trainer

    first = make_trainer(tmp_path, "train.steps=6", "checkpoint.persist_every=2", "checkpoint.sign=false")
    first.fit()
    root = Path(first.run_dir) / "checkpoints"
    *_, previous, newest = CheckpointStore(str(root)).committed_steps()
    try:  # memory gone: only storage remains
        psutil.Process(keeper_pid(Path(first.run_dir), 0)).kill()
    except (OSError, psutil.Error):
        pass
    marker = tmp_path / "ran"
    rewrite(root / f"step-{newest}", ".metadata", attacks(marker)["builtins.eval"])
    resumed = make_trainer(tmp_path, "train.steps=8", "checkpoint.persist_every=2", "checkpoint.sign=false")
    with pytest.warns(UserWarning, match=f"step-{newest} skipped"):
        assert resumed.restore() == previous
    skipped = [e for e in events(resumed.run_dir) if e["event"] == "checkpoint_skipped"][-1]
    assert skipped["step"] == newest and f"step-{newest}/.metadata" in skipped["problem"], skipped
    assert "builtins.eval" in skipped["problem"] and not marker.exists()
    resumed.snapshots.close(release=True)


def test_a_rewritten_shard_with_a_rewritten_digest_is_refused_when_signed(tmp_path):
    key = signing_key(SECRET)
    signed = write_steps(tmp_path / "signed", key=key)
    unsigned = write_steps(tmp_path / "plain")
    for root in (tmp_path / "signed", tmp_path / "plain"):
        shard = root / "step-2" / "__0_0.distcp"
        data = bytearray(shard.read_bytes())
        data[-100] ^= 0xFF  # inside the last item's tensor bytes: a value changed, every structure intact
        rewrite(root / "step-2", "__0_0.distcp", bytes(data))
    problems = signed.verify(2)
    assert len(problems) == 1 and "signature does not verify" in problems[0] and "tampered" in problems[0], problems
    assert signed.newest_valid(lambda step, problem: None) == 1
    assert unsigned.verify(2) == []  # what signing is for: without it, a consistent rewrite is undetectable
    # Another run's key is named as such, not as tampering; no key at all skips the check.
    other = CheckpointStore(str(tmp_path / "signed"), key=signing_key(b"\x01" * 32))
    assert "another key" in other.verify(1)[0]
    assert CheckpointStore(str(tmp_path / "signed")).verify(1) == []


def test_unsigned_checkpoints_are_adopted_only_on_request(tmp_path, capsys, monkeypatch):
    from phalanx.cli import main

    run = tmp_path / "run"
    write_steps(run / "checkpoints")  # as an older phalanx or another tool wrote them: unsigned
    (run / ".keeper-secret").write_text(SECRET.hex())
    assert main(["ckpt", "verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "step-2: FAILED" in out and "not signed" in out and "--step 2 --trust" in out
    assert main(["ckpt", "verify", str(run), "--step", "2", "--trust"]) == 0
    assert "adopted" in capsys.readouterr().out
    lines, ok = tools.verify_checkpoints(str(run))
    assert not ok and lines[-1] == "step-2: verified (3 files, " + lines[-1].split(", ", 1)[1], lines
    assert lines[-1].endswith("signed)") and "step-1: FAILED" in lines
    manifest = json.loads((run / "checkpoints" / "step-2" / "manifest.json").read_text())
    assert manifest["adopted"]["previous_key_id"] is None
    # Verified with another run's secret: that run's signature is named as another key's.
    other = tmp_path / "other.key"
    other.write_text((b"\x07" * 32).hex())
    lines, ok = tools.verify_checkpoints(str(run), 2, key_file=str(other))
    assert not ok and "another key" in lines[1]
    monkeypatch.setenv("PHALANX_RUN_SECRET", "not-hex")
    with pytest.raises(PhalanxError, match="PHALANX_RUN_SECRET must hold"):
        tools.verify_checkpoints(str(run))
    monkeypatch.delenv("PHALANX_RUN_SECRET")
    with pytest.raises(PhalanxError, match="--trust adopts one checkpoint"):
        tools.verify_checkpoints(str(run), trust=True)


def test_planted_results_records_are_not_signed_into_a_manifest(tmp_path):
    """A `.results/rank-R.json` planted before the keeper writes its own is not this run's (no MAC):
    the coordinator waits for the real one instead of signing what the planted one says."""
    key = signing_key(SECRET)
    store = write_steps(tmp_path, steps=(1,), key=key)
    results = tmp_path / "step-5" / ".results"
    results.mkdir(parents=True)
    (results / "rank-0.json").write_text(json.dumps({"step": 5, "rank": 0, "items": [], "files": {}}))
    with pytest.raises(PhalanxError, match="not this run's"):
        store.finalize(5, 1, timeout_s=0.5, keep_last=0, info={})
    assert store.manifest(5) is None


def test_fuzzed_stored_files_end_in_a_refusal_or_a_verified_load():
    """A fixed budget here; `python -m tests.checkpoint.fuzz_stored --examples N` runs longer."""
    result = subprocess.run([sys.executable, "-m", "tests.checkpoint.fuzz_stored", "--examples", "40"], cwd=REPO,
                            env=loopback_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["cases"] == 40 and report["failures"] == [], report
    assert report["outcomes"].get("refused at verify, loaded step 1", 0) > 0, report
    assert report["max_rss_mib"] < 1024, report  # the stated bound: claims of up to 2**64 bytes allocate nothing
