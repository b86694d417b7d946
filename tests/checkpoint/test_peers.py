"""Peer keeper connections: a connection that failed is closed and forgotten, and the next use reconnects
(the peer's keeper may have been restarted); this node's keeper goes through the rank's own connection."""

from __future__ import annotations

import pytest

from phalanx.checkpoint import peers as peers_module
from phalanx.checkpoint.peers import PeerKeepers
from phalanx.checkpoint.wire import WireError


class FakeClient:
    made: list["FakeClient"] = []

    def __init__(self, host, port, secret, timeout):
        self.address, self.closed, self.fail = f"{host}:{port}", False, False
        FakeClient.made.append(self)

    def call(self, op, payload=None, limit=None, **fields):
        if self.fail:
            raise WireError(f"keeper {self.address} did not answer '{op}': Connection reset by peer")
        return {"op": op, **fields}, None

    def close(self):
        self.closed = True


class FakeSlots:
    node = 0

    def __init__(self):
        self.requests = []

    def request(self, op, **fields):
        self.requests.append(op)
        return {"own": True}, None


@pytest.fixture
def peers(monkeypatch):
    FakeClient.made = []
    monkeypatch.setattr(peers_module, "KeeperClient", FakeClient)
    out = PeerKeepers(FakeSlots(), b"s" * 32, timeout=5.0)
    out.addresses = {0: ("127.0.0.1", 1000), 1: ("127.0.0.1", 1001)}
    return out


def test_a_failed_peer_connection_is_closed_forgotten_and_made_again(peers):
    assert peers.call(1, "fetch", rank=2, step=5)[0]["step"] == 5
    first = FakeClient.made[0]
    assert peers.call(1, "inventory")[0]["op"] == "inventory" and len(FakeClient.made) == 1  # reused
    first.fail = True
    with pytest.raises(WireError):
        peers.call(1, "fetch", rank=2, step=6)
    assert first.closed and 1 not in peers.clients
    assert peers.call(1, "fetch", rank=2, step=6)[0]["step"] == 6  # a new connection
    assert len(FakeClient.made) == 2 and FakeClient.made[1] is not first


def test_this_nodes_keeper_goes_through_the_ranks_own_connection(peers):
    assert peers.call(0, "fetch_parity", gid=0, j=0, step=3)[0] == {"own": True}
    assert peers.slots.requests == ["fetch_parity"] and FakeClient.made == []


def test_close_closes_every_peer_connection(peers):
    peers.call(1, "inventory")
    peers.close()
    assert FakeClient.made[0].closed and peers.clients == {}
