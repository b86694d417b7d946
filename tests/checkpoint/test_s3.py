"""The persistent tier on S3: checkpoint.storage=s3://... against moto's S3 server on loopback (s3fs, as a user
has it). One run trains to step 20 and persists steps 10 and 20; every test resumes it, or a copy of it (its
run folder and its objects), with no keeper holding its state, so whatever it restores comes from S3."""

from __future__ import annotations

import copy
import ipaddress
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import psutil
import pytest

from phalanx.cli import main
from phalanx.checkpoint.persistent import CheckpointStore
from tests.checkpoint.test_recovery import keeper_pid
from tests.helpers import assert_bitwise_equal, events
from tests.trainer.test_trainer import make_trainer

# One server and one trained run for the module: on one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group(name="s3")

BUCKET = "phalanx-test"
RUN = ("train.steps=20", "checkpoint.persist_every=10")
SAVED = ("model", "optim", "data", "lr_schedule", "step", "rng")  # what a resume must restore bit for bit


def loopback(address: Any) -> bool:
    """A unix socket's path, an IP address on loopback (IPv4-mapped IPv6 too), or the name localhost."""
    if not isinstance(address, tuple):
        return True
    try:
        ip = ipaddress.ip_address(str(address[0]).split("%")[0])
    except ValueError:
        return address[0] == "localhost"
    return ip.is_loopback or (ip.version == 6 and bool(ip.ipv4_mapped) and ip.ipv4_mapped.is_loopback)


@dataclass
class S3:
    endpoint: str
    fs: Any  # a client of the server of its own, as another machine has it (no listing shared with phalanx's)
    foreign: list  # connections refused: any address but loopback

    def url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    def check_sockets(self, pid: int) -> None:
        """Every socket of process `pid` (a keeper, which writes to S3) is on loopback."""
        try:
            bad = [(c.laddr, c.raddr) for c in psutil.Process(pid).net_connections(kind="inet")
                   if not (loopback(tuple(c.laddr)) and (not c.raddr or loopback(tuple(c.raddr))))]
        except psutil.NoSuchProcess:
            return
        self.foreign += bad


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 (a free port) with an empty bucket; AWS settings that reach it and nothing
    else, in this process and in every process it starts (keepers); connections elsewhere are refused."""
    import fsspec
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    foreign: list = []

    def guard(connect: Callable) -> Callable:
        def guarded(sock: socket.socket, address: Any) -> Any:
            if not loopback(address):
                foreign.append(address)
                raise ConnectionRefusedError(f"test_s3: connection to {address} refused (loopback only)")
            return connect(sock, address)
        return guarded

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:  # no name reaches a DNS server (AWS's, say)
        if host is not None and not loopback((host.decode() if isinstance(host, bytes) else host, 0)):
            foreign.append(host)
            raise socket.gaierror(socket.EAI_NONAME, f"test_s3: {host} not resolved (loopback only)")
        return getaddrinfo(host, *args, **kwargs)

    getaddrinfo = socket.getaddrinfo

    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint,
                            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            mp.delenv(name, raising=False)
        mp.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})  # fsspec read FSSPEC_* when imported
        mp.setattr(socket.socket, "connect", guard(socket.socket.connect))
        mp.setattr(socket.socket, "connect_ex", guard(socket.socket.connect_ex))
        mp.setattr(socket, "getaddrinfo", resolve)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        try:
            yield S3(endpoint, fs, foreign)
        finally:
            s3fs.S3FileSystem.clear_instance_cache()  # its instances talk to this server only
            server.stop()
    assert not foreign, f"connections to addresses other than loopback: {foreign}"


@dataclass
class Trained:
    run_dir: Path
    states: dict[int, dict]  # step -> the trainer's state then (`SAVED`)


def keeper(run_dir: Path) -> Optional[int]:
    """The pid of the run's keeper; None before it announced itself, or after it left."""
    try:
        return keeper_pid(run_dir, 0)
    except (OSError, ValueError):
        return None


def stop_keepers(s3: S3, run_dir: Path) -> None:
    """The run's keeper, killed (a fresh machine: no state in memory); its sockets were on loopback only."""
    pid = keeper(run_dir)
    if pid is None:
        return
    s3.check_sockets(pid)
    try:
        proc = psutil.Process(pid)
        proc.kill()
        proc.wait(timeout=30)
    except psutil.NoSuchProcess:
        pass


def saved(trainer) -> dict:
    """A copy of the trainer's state as it is now (the parts in `SAVED`)."""
    return copy.deepcopy({k: v for k, v in trainer.state_dict().items() if k in SAVED})


@pytest.fixture(scope="module")
def trained(s3, tmp_path_factory) -> Trained:
    """20 steps of the tests' tiny model persisted to s3://BUCKET/run at steps 10 and 20, its keeper gone."""
    trainer = make_trainer(tmp_path_factory.mktemp("s3"), *RUN, f"checkpoint.storage={s3.url('run')}")
    states: dict[int, dict] = {}

    def watch(trainer, metrics: dict) -> None:
        pid = keeper(Path(trainer.run_dir))
        if pid is not None:
            s3.check_sockets(pid)  # while it persists to S3
        if trainer.step == 10:
            states[10] = saved(trainer)

    trainer.hooks.append(watch)
    trainer.fit()
    states[20] = saved(trainer)
    stop_keepers(s3, Path(trainer.run_dir))
    return Trained(Path(trainer.run_dir), states)


def copy_run(s3: S3, trained: Trained, root: Path) -> tuple[Path, str]:
    """A copy of the trained run: its folder under `root` (no keeper: keepers belong to a folder's path) and its
    objects under another prefix, which the copy's config.yaml names. Returns (run folder, storage URL)."""
    run_dir, url = root / "t", s3.url(root.name)
    shutil.copytree(trained.run_dir, run_dir)
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace(s3.url("run"), url))
    s3.fs.copy(f"{BUCKET}/run", f"{BUCKET}/{root.name}", recursive=True)
    return run_dir, url


def resume(run_dir: Path, url: str, *extra: str):
    """A trainer of `run_dir` on `url`, as a relaunch on a fresh machine builds it (not yet restored)."""
    return make_trainer(run_dir.parent, *RUN, f"checkpoint.storage={url}", *extra)


def last(run_dir: Path, kind: str) -> dict:
    found = [e for e in events(run_dir) if e["event"] == kind]
    assert found, f"no {kind} event in {run_dir}/events.jsonl"
    return found[-1]


def test_a_run_resumes_from_s3_bit_for_bit(s3, trained):
    assert CheckpointStore(s3.url("run")).committed_steps() == [10, 20]
    trainer = resume(trained.run_dir, s3.url("run"))
    try:
        assert trainer.restore() == 20
        restore = last(trained.run_dir, "restore")
        assert restore["restored_from"] == "storage" and restore["step"] == 20, restore
        assert_bitwise_equal(trained.states[20], saved(trainer))
    finally:
        trainer.snapshots.close(release=True)
        stop_keepers(s3, trained.run_dir)


def test_ckpt_ls_verify_and_export_read_the_run_from_s3(s3, trained, tmp_path, capsys):
    from safetensors.torch import load_file

    run_dir = str(trained.run_dir)
    assert main(["ckpt", "ls", run_dir]) == 0
    out = capsys.readouterr().out
    assert f"(storage: {s3.url('run')})" in out, out
    stored = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isdigit() and " storage " in line}
    assert set(stored) == {"10", "20"} and all(cells[-1] == "yes" for cells in stored.values()), out
    assert main(["ckpt", "verify", run_dir]) == 0
    out = capsys.readouterr().out
    assert "step-10: verified" in out and "step-20: verified" in out and "signed" in out, out
    weights = tmp_path / "w.safetensors"
    assert main(["ckpt", "export", run_dir, "--step", "20", "--out", str(weights)]) == 0
    exported, model = load_file(weights), trained.states[20]["model"]
    assert exported.keys() == model.keys()
    assert_bitwise_equal(model, exported, "model")


def test_a_flipped_byte_on_s3_fails_verify_and_the_resume_falls_back_to_step_10(s3, trained, tmp_path, capsys):
    run_dir, url = copy_run(s3, trained, tmp_path / "flipped")
    shard = f"{BUCKET}/flipped/step-20/__0_0.distcp"
    data = bytearray(s3.fs.cat_file(shard))
    data[len(data) // 2] ^= 0x01
    s3.fs.pipe_file(shard, bytes(data))
    assert main(["ckpt", "verify", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "step-10: verified" in out and "step-20: FAILED" in out and f"{shard} does not match" in out, out

    trainer = resume(run_dir, url)
    try:
        with pytest.warns(UserWarning, match="step-20 skipped"):
            assert trainer.restore() == 10
        skipped = last(run_dir, "checkpoint_skipped")
        assert skipped["step"] == 20 and shard in skipped["problem"], skipped
        restore = last(run_dir, "restore")
        assert restore["restored_from"] == "storage" and restore["step"] == 10, restore
        assert_bitwise_equal(trained.states[10], saved(trainer))
    finally:
        trainer.snapshots.close(release=True)
        stop_keepers(s3, run_dir)


def test_a_torn_write_on_s3_is_ignored_and_retention_deletes_old_objects(s3, trained, tmp_path, capsys):
    """Step 22 holds step 20's files but no manifest (a keeper that died mid-persist): listed as incomplete, never
    restored. The resumed run persists step 25 at its end with keep_last=2: step 10's objects and the torn folder
    go. A store that listed the run before another machine wrote to it lists what is there now (fsspec caches
    listings: a stale one once hid the newer steps)."""
    run_dir, url = copy_run(s3, trained, tmp_path / "torn")
    listed = CheckpointStore(url)
    assert listed.committed_steps() == [10, 20]
    for name in s3.fs.ls(f"{BUCKET}/torn/step-20", detail=False):
        if not name.endswith("manifest.json"):
            s3.fs.copy(name, name.replace("/step-20/", "/step-22/"))
    assert listed.step_dirs() == [10, 20, 22] and listed.committed_steps() == [10, 20]
    assert main(["ckpt", "ls", str(run_dir)]) == 0
    out = capsys.readouterr().out
    stored = {line.split()[0]: line for line in out.splitlines() if line[:1].isdigit() and " storage " in line}
    assert set(stored) == {"10", "20", "22"} and stored["22"].endswith("incomplete (no manifest)"), out
    assert stored["20"].endswith("yes"), out

    trainer = resume(run_dir, url, "train.steps=25", "checkpoint.keep_last=2")
    with pytest.warns(UserWarning, match="step-22 skipped"):
        trainer.fit()
    stop_keepers(s3, run_dir)
    restore = [e for e in events(run_dir) if e["event"] == "restore"][-1]
    assert restore["restored_from"] == "storage" and restore["step"] == 20, restore
    assert "manifest.json" in last(run_dir, "checkpoint_skipped")["problem"]
    s3.fs.invalidate_cache()
    left = sorted({name.split("/")[2] for name in s3.fs.find(f"{BUCKET}/torn")})
    assert left == ["step-20", "step-25"], left
    assert listed.committed_steps() == [20, 25]
    assert json.loads(s3.fs.cat_file(f"{BUCKET}/torn/step-25/manifest.json"))["step"] == 25
