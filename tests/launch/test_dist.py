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
from phalanx.launch.dist import rendezvous_store
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
