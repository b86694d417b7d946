"""Shared helpers: tiny configs, running the CLI in a subprocess, torchrun on loopback, checkpoint reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from phalanx.parallel.local_ranks import free_port

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.yaml")

# A model small enough that a 2-core machine runs a dozen steps in a couple of seconds.
TINY = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=32",
    "data.seq_len=32", "train.batch_size=8", "train.micro_batch_size=4", "train.eval_every=0",
    "log.wandb=disabled", "log.progress=lines", "optim.warmup_steps=2", "log.every=1",
]


def assert_refused(overrides: list[str], words: list[str], world: int = 1) -> None:
    """`validate()` of configs/tiny.yaml with `overrides` at `world` ranks raises a ConfigError naming every word."""
    import pytest

    from phalanx.config import load_config
    from phalanx.errors import ConfigError
    from phalanx.parallel import validate

    with pytest.raises(ConfigError) as err:
        validate(load_config(CONFIG, overrides), world_size=world)
    for word in words:
        assert word in str(err.value), str(err.value)


def run_overrides(run_dir: Path, *extra: str) -> list[str]:
    # Keepers of runs a test kills and never relaunches go away soon (conftest kills the rest).
    return [*TINY, f"run.dir={run_dir}", "run.name=t", "checkpoint.keeper_linger_s=60", *extra]


def loopback_env(threads: int = 1) -> dict:
    env = dict(os.environ)
    env.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def phalanx_cmd(args: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "phalanx", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "phalanx", *args]


def run_phalanx(args: list[str], nproc: int = 1, timeout: float = 300, threads: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(phalanx_cmd(args, nproc), cwd=REPO, env=loopback_env(threads), capture_output=True,
                          text=True, timeout=timeout)


# The tests' worlds are 1 to 4 ranks: one pool of 4 serves them all.
POOL_SIZE = 4


def _train_rank(config: str, overrides: list[str]) -> None:
    from phalanx.launch.run import rank_config, run_rank

    run_rank(rank_config(config, overrides))


def train_local(config: str, overrides: list[str], world: int = 1) -> None:
    """What `phalanx train CONFIG OVERRIDES` does on `world` torchrun ranks, run on the pooled local ranks of
    `phalanx.parallel.local_ranks` (the same code as a torchrun rank, one torch thread each, in processes the
    pool spawned once and reuses; none is started per run): for failure-free reference runs."""
    from phalanx.parallel.local_ranks import run_local

    run_local(_train_rank, world, str(config), list(overrides), pool_size=POOL_SIZE)


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def events(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; a replayed step after a resume replaces the earlier record."""
    return {m["step"]: m["loss"] for m in metrics(run_dir)}


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m["step"] >= step for m in metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (code {proc.returncode}) before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached within {timeout}s")


def load_checkpoint(path: Path, rank_local: bool = True) -> dict:
    """A checkpoint folder as one dict: the DCP part, plus each rank's own file under "rank-R" (not read
    with `rank_local=False`: ZeRO's hold DeepSpeed objects that only a trainer's template rebuilds)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = Path(str(path) + ".pt-export")
    if not out.exists():
        dcp_to_torch_save(str(path), str(out))
    state = torch.load(out, weights_only=False)
    from phalanx.checkpoint.vetted import read_rank_local

    for rank_file in sorted(Path(path).glob("rank-*.safetensors")) if rank_local else []:
        state[rank_file.stem] = read_rank_local(rank_file.read_bytes())
    return state


def assert_bitwise_equal(a, b, prefix: str = "state") -> None:
    """Equal bit for bit, through nested dicts, lists and tuples of tensors, arrays and plain values."""
    import numpy as np

    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{prefix}: keys differ: {set(a) ^ set(b)}"
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{prefix}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{prefix}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{prefix}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{prefix} differs: max |diff| {(a.float() - b.float()).abs().max()}"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"{prefix} differs"
    elif type(a).__eq__ is object.__eq__ and hasattr(a, "__dict__"):  # e.g. DeepSpeed's loss scaler
        assert type(a) is type(b), f"{prefix}: {type(a)} != {type(b)}"
        assert_bitwise_equal(vars(a), vars(b), prefix)
    else:
        assert a == b, f"{prefix}: {a!r} != {b!r}"


def final_checkpoint(run_dir: Path, step: Optional[int] = None) -> Path:
    root = Path(run_dir) / "checkpoints"
    steps = sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / "manifest.json").exists())
    return root / f"step-{step if step is not None else steps[-1]}"


def kill_tree(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts each rank in its own session,
    so killing torchrun's process group alone would leave the ranks running), then wait until all are gone."""
    import psutil

    try:
        victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        victims = []
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=timeout)
    _, alive = psutil.wait_procs(victims, timeout=timeout)
    assert not alive, f"still running after SIGKILL: {alive}"


def assert_loopback_only() -> None:
    """Ray, as this process has it (a local instance or a `Cluster` it started), is on loopback only: every
    node and the GCS advertise 127.0.0.1, and no socket of this process, its descendants (GCS, raylets,
    agents, workers) or any process of the Ray session binds or connects to another address."""
    import ipaddress

    import psutil
    import ray

    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:"), ray.get_runtime_context().gcs_address
    addresses = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    assert addresses and set(addresses.values()) == {"127.0.0.1"}, addresses
    me = psutil.Process()
    procs = {p.pid: p for p in [me, *me.children(recursive=True)]}
    session = ray._private.worker._global_node.get_session_dir_path()
    for proc in psutil.process_iter(["cmdline"]):
        if session in " ".join(proc.info["cmdline"] or []):
            procs[proc.pid] = proc

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip.split("%")[0])
        return address.is_loopback or (address.version == 6 and bool(address.ipv4_mapped)
                                       and address.ipv4_mapped.is_loopback)

    bad = [(c.pid, c.laddr, c.raddr, c.status) for c in psutil.net_connections(kind="inet")
           if c.pid in procs and not (loopback(c.laddr.ip) and (not c.raddr or loopback(c.raddr.ip)))]
    assert len(procs) > 3 and not bad, f"non-loopback sockets of Ray's processes: {bad}"


def assert_params_close(got: dict, want: dict, rel: float = 1e-4) -> None:
    """Every tensor of `got` within `rel` of `want`'s, relative to the tensor's largest entry (an entry near zero
    has no meaningful relative error of its own): the "final parameters within 1e-4" of the parity tests."""
    assert got.keys() == want.keys(), set(got) ^ set(want)
    for name, value in want.items():
        diff = (got[name].float() - value.float()).abs().max().item()
        scale = value.float().abs().max().item()
        assert diff <= rel * scale, f"{name}: max |diff| {diff:.3g} > {rel} x max |value| {scale:.3g}"
