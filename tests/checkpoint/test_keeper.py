"""The keeper and its wire: strangers and corrupted blocks are refused; slots, parity and stale steps
behave as the snapshot protocol needs; erasure groups follow the placement rule; the flat layout
round-trips a trainer-like state without pickling."""

from __future__ import annotations

import mmap
import random
import socket
import struct
import threading

import numpy as np
import pytest
import torch

from phalanx.checkpoint.erasure import ErasureCodec
from phalanx.checkpoint.flat import FlatLayout
from phalanx.checkpoint.groups import erasure_groups
from phalanx.checkpoint.keeper import Keeper, discovery_file
from phalanx.checkpoint.wire import MAGIC, KeeperClient, WireError, handshake_client, recv

SECRET = bytes(range(32))


@pytest.fixture
def keeper(tmp_path):
    k = Keeper("run", 0, SECRET, "127.0.0.1", str(tmp_path), linger_s=30)
    thread = threading.Thread(target=k.serve, daemon=True)
    thread.start()
    path = discovery_file(str(tmp_path), "run", 0)
    for _ in range(200):
        try:
            import json

            with open(path) as f:
                info = json.load(f)
            break
        except (OSError, ValueError):
            threading.Event().wait(0.02)
    yield k, info["port"]
    k.stop_requested = True
    k.last_activity = 0


def test_a_client_without_the_secret_is_refused(keeper):
    _, port = keeper
    with pytest.raises(WireError, match="secret"):
        KeeperClient("127.0.0.1", port, b"x" * 32, timeout=5).call("inventory")


def test_a_payload_with_a_wrong_checksum_is_refused(keeper):
    k, port = keeper
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    handshake_client(sock, SECRET)
    payload = b"\x01" * 16
    header = b'{"op":"parity_add","gid":0,"j":0,"step":1,"index":0,"members":[0,1],"length":16,"fp":"f",' \
             b'"epoch":"e","crc":12345}'
    sock.sendall(struct.pack("<4sIQ", MAGIC, len(header), len(payload)) + header + payload)
    with pytest.raises((WireError, ConnectionError, OSError)):
        recv(sock)  # the keeper drops the connection: nothing was accumulated
    assert k.parity == {}


def test_slots_parity_and_stale_steps(keeper):
    k, port = keeper
    client = KeeperClient("127.0.0.1", port, SECRET, timeout=5)
    paths = client.call("register", rank=0, nbytes=64, plan={"fingerprint": "f"})[0]["paths"]
    assert len(paths) == 3
    for step in (1, 2, 3, 4):
        slot = client.call("begin", rank=0, step=step)[0]["slot"]
        with open(paths[slot], "r+b") as f, mmap.mmap(f.fileno(), 64) as m:
            m[:8] = step.to_bytes(8, "little")
        client.call("complete", rank=0, slot=slot, step=step)
    held = client.call("inventory")[0]["data"]["0"]
    assert sorted(s for s, _ in held["steps"]) == [2, 3, 4] and held["fp"] == "f"  # three slots
    _, block = client.call("fetch", rank=0, step=3)
    assert bytes(block[:8]) == (3).to_bytes(8, "little")
    # A relaunch that restored step 1 snapshots step 2 again: steps 2 to 4 of the old timeline go.
    client.call("begin", rank=0, step=2)
    assert client.call("inventory")[0]["data"]["0"]["steps"] == []
    # Parity: contributions of both members accumulate; a new epoch of the same step starts over.
    codec = ErasureCodec(2, 1)
    blocks = [torch.randint(0, 256, (16,), dtype=torch.uint8) for _ in range(2)]
    for i, block in enumerate(blocks):
        part = codec.parity_contributions(i, block)[0]
        reply = client.call("parity_add", payload=memoryview(part.numpy()), gid=0, j=0, step=5, index=i,
                            members=[0, 1], length=16, fp="f", epoch="a")[0]
    assert reply["complete"]
    _, parity = client.call("fetch_parity", gid=0, j=0, step=5)
    assert torch.equal(torch.frombuffer(bytearray(parity), dtype=torch.uint8), codec.encode(blocks)[0])
    client.call("parity_add", payload=memoryview(blocks[0].numpy()), gid=0, j=0, step=5, index=0, members=[0, 1],
                length=16, fp="f", epoch="b")
    with pytest.raises(WireError, match="no complete parity"):
        client.call("fetch_parity", gid=0, j=0, step=5)
    client.close()


@pytest.mark.parametrize("nodes,ranks_per_node,k,m", [(3, 1, 2, 1), (4, 2, 2, 1), (5, 3, 3, 2), (8, 4, 4, 2)])
def test_erasure_groups_put_members_and_parity_on_distinct_nodes(nodes, ranks_per_node, k, m):
    node_of_rank = [r // ranks_per_node for r in range(nodes * ranks_per_node)]
    groups, _ = erasure_groups(node_of_rank, k, m)
    assert sorted(r for g in groups for r in g.members) == list(range(len(node_of_rank)))
    for group in groups:
        member_nodes = [node_of_rank[r] for r in group.members]
        assert len(set(member_nodes)) == len(member_nodes) <= k
        assert len(set(group.parity_nodes)) == m and not set(group.parity_nodes) & set(member_nodes)


def test_too_few_nodes_for_k_plus_m_turns_coding_off_with_the_reason():
    groups, reason = erasure_groups([0, 0, 1, 1], 2, 1)
    assert groups == [] and "needs 3 nodes" in reason


def test_flat_layout_round_trips_a_trainer_like_state():
    state = {
        "model": {"w": torch.randn(3, 5), "b": torch.zeros(5, dtype=torch.bfloat16)},
        "optim": {"state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 5)}},
                  "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": ["w"]}]},
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "step": 7, "data": {"consumed": 56},
    }
    layout = FlatLayout.of(state)
    block = torch.zeros(layout.nbytes, dtype=torch.uint8)
    layout.pack(block, state)
    back = layout.unpack(block)
    from tests.helpers import assert_bitwise_equal

    numpy_state = back["rng"].pop("numpy")
    expected = state["rng"].pop("numpy")
    assert_bitwise_equal(state, back)
    assert numpy_state[0] == expected[0] and np.array_equal(numpy_state[1], expected[1])
    assert numpy_state[2:] == expected[2:]
    assert layout.matches(state) and not layout.matches({**state, "model": {"w": torch.randn(4, 5)}})
