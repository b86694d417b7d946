"""The process group's rendezvous store listens on MASTER_ADDR only (torch's own server binds `::`, every
interface), and its errors name the value and the fix."""

from __future__ import annotations

import datetime
import os
import socket

import psutil
import pytest
import torch.distributed as dist

from phalanx.errors import ConfigError
from phalanx.parallel.dist import rendezvous_store
from tests.helpers import free_port

TIMEOUT = datetime.timedelta(seconds=10)


def listening(pid: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections(kind="inet") if c.pid == pid and c.status == "LISTEN"}


def test_rank_0s_store_listens_on_master_addr_only_and_serves_the_others(monkeypatch):
    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    before = listening(os.getpid())
    server = rendezvous_store(0, 2, TIMEOUT)
    assert listening(os.getpid()) - before == {"127.0.0.1"}
    client = rendezvous_store(1, 2, TIMEOUT)
    client.set("from rank 1", "hello")
    assert server.get("from rank 1") == b"hello"
    del client, server


def test_under_torchrun_the_agents_store_is_used(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert rendezvous_store(0, 2, TIMEOUT) is None


def test_a_taken_port_or_a_missing_address_is_refused_with_the_fix(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ConfigError, match="MASTER_ADDR=None"):
        rendezvous_store(0, 2, TIMEOUT)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(taken.getsockname()[1]))
        with pytest.raises(ConfigError, match="pick a free port"):
            rendezvous_store(0, 2, TIMEOUT)
    assert not dist.is_initialized()


# A rank that stays alive after its run, as a Ray worker does (it is reused for the next attempt): prints the
# time its run returned, then waits to be killed.
STAY = """import sys, time
from phalanx.cli import main
try:
    main(sys.argv[1:])
finally:
    print(f"returned {time.time()}", flush=True)
    time.sleep(300)
"""


@pytest.mark.slow
def test_a_killed_rank_ends_every_other_ranks_run_at_once_not_after_the_collective_timeout(tmp_path):
    """4 ranks whose processes outlive their runs, as Ray workers do (nothing kills the rest, and exiting
    would close their sockets anyway): rank 3 is SIGKILLed after step 3. Every survivor's run must fail
    within seconds, not wait out fault.collective_timeout_s=120 in a collective with a peer that failed
    but still holds its process groups: a failed rank lets them go (`launch.run.run_rank`, `SnapshotEngine.close`)."""
    import subprocess
    import sys
    import threading
    import time

    from tests.helpers import CONFIG, REPO, events, loopback_env, run_overrides

    port = free_port()
    args = ["train", CONFIG, *run_overrides(tmp_path, "train.steps=40", "train.batch_size=8", "train.micro_batch_size=2",
                                            "fault.collective_timeout_s=120", "fault.inject=[kill:rank=3:step=3]",
                                            "checkpoint.persist_every=0")]
    procs = []
    for rank in range(4):
        env = loopback_env()
        env.update(RANK=str(rank), WORLD_SIZE="4", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="4", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", STAY, *args], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        procs[3].wait(timeout=120)
        killed = time.time()
        assert procs[3].returncode == -9, f"rank 3 was not killed by its fault: {procs[3].stdout.read()[-2000:]}"
        returned: list[float] = []

        def read(proc):
            for line in proc.stdout:
                if line.startswith("returned "):
                    returned.append(float(line.split()[1]))

        for proc in procs[:3]:
            threading.Thread(target=read, args=(proc,), daemon=True).start()
        deadline = killed + 60  # the survivors' own collective timeout would end their runs after 120 s
        while len(returned) < 3 and time.time() < deadline:
            time.sleep(0.1)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    injected = [e for e in events(tmp_path / "t") if e["event"] == "fault_injected"]
    assert [e["step"] for e in injected] == [3], injected
    assert len(returned) == 3, returned
    assert max(returned) - killed < 30, f"survivors' runs ended {[round(t - killed, 1) for t in returned]}s after the kill"
