"""The keeper and its wire: strangers and corrupted blocks are refused; slots, parity and stale steps
behave as the snapshot protocol needs; erasure groups follow the placement rule; the flat layout
round-trips a trainer-like state without pickling. Hostile bytes: a flood of idle connections, oversized
frames, malformed requests and fuzzed streams cost the keeper nothing and leave it serving."""

from __future__ import annotations

import json
import mmap
import os
import random
import socket
import stat
import struct
import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from phalanx.checkpoint.erasure import ErasureCodec
from phalanx.checkpoint.flat import FlatLayout
from phalanx.checkpoint.gate import to_close
from phalanx.checkpoint.groups import erasure_groups
from phalanx.checkpoint.keeper import Keeper, discovery_file, node_dir
from phalanx.checkpoint.link import read_discovery
from phalanx.checkpoint.wire import (MAGIC, SMALL_PAYLOAD_BYTES, Field, KeeperClient, WireError, field_problem,
                                     handshake_client, recv, send)

SECRET = bytes(range(32))
FUZZ_EXAMPLES = int(os.environ.get("PHALANX_FUZZ_EXAMPLES", "200"))


def _start(tmp_path, **options):
    """A keeper serving in a thread of this process, and its port."""
    k = Keeper("run", 0, SECRET, "127.0.0.1", str(tmp_path), 30, **options)
    thread = threading.Thread(target=k.serve, daemon=True)
    thread.start()
    path = discovery_file(str(tmp_path), "run", 0)
    deadline = time.monotonic() + 10
    while (info := read_discovery(path)) is None:
        assert time.monotonic() < deadline, "the keeper did not write its discovery file"
        time.sleep(0.02)
    return k, info["port"], thread


def _stop(k, thread, port=None):
    k.stop_requested = True
    k.last_activity = 0
    if port is not None:  # a connection wakes the serving loop for its idle check
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            pass
    thread.join(timeout=5)


@pytest.fixture
def keeper(tmp_path):
    k, port, thread = _start(tmp_path)
    yield k, port
    _stop(k, thread, port)


@pytest.fixture
def thread_errors(monkeypatch):
    """Exceptions that end any thread (the keeper's included) during the test."""
    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    return errors


def _authenticated(port, timeout=5.0):
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    handshake_client(sock, SECRET)
    return sock


def _closed_by_peer(sock, timeout=5.0):
    """True once the peer closed `sock` (whatever it sent first is read and dropped)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not sock.recv(65536):
                return True
    except socket.timeout:
        return False
    except OSError:  # reset: closed too
        return True
    return False


def _inventory_answers(port, within=5.0):
    client = KeeperClient("127.0.0.1", port, SECRET, timeout=within)
    try:
        return client.call("inventory")[0]["node"] == 0
    finally:
        client.close()


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
    assert k.parity.slots == {}


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
    _, block = client.call("fetch", rank=0, step=3, limit=64)
    assert bytes(block[:8]) == (3).to_bytes(8, "little")
    wary = KeeperClient("127.0.0.1", port, SECRET, timeout=5)
    with pytest.raises(WireError, match="64 bytes exceeds the 63-byte limit"):  # the client bounds replies too
        wary.call("fetch", rank=0, step=3, limit=63)
    wary.close()
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
    _, parity = client.call("fetch_parity", gid=0, j=0, step=5, limit=16)
    assert torch.equal(torch.frombuffer(bytearray(parity), dtype=torch.uint8), codec.encode(blocks)[0])
    client.call("parity_add", payload=memoryview(blocks[0].numpy()), gid=0, j=0, step=5, index=0, members=[0, 1],
                length=16, fp="f", epoch="b")
    with pytest.raises(WireError, match="no complete parity"):
        client.call("fetch_parity", gid=0, j=0, step=5)
    client.close()


def test_a_parity_holder_keeps_its_members_layouts_until_a_new_layout_commits(keeper):
    """A member lost with its node is decoded from its group; resharding it into another layout needs its flat
    layout, so the parity holder asks each member once for it and serves it. A new layout's first commit drops
    the old layout's parity and layouts with the rest of its memory."""
    _, port = keeper
    client = KeeperClient("127.0.0.1", port, SECRET, timeout=5)
    client.call("register", rank=0, nbytes=64, plan={"fingerprint": "old"})
    parity = dict(gid=0, j=0, step=5, members=[2, 3], length=16, fp="old", epoch="a", k=2, m=1)
    reply = client.call("parity_add", payload=memoryview(b"\x01" * 16), index=0, **parity)[0]
    assert reply["need_layout"] and not reply["complete"]
    client.call("member_layout", rank=2, fp="old", layout={"leaves": [], "skeleton_capacity": 8}, nbytes=16)
    assert client.call("layout", rank=2, fp="old")[0] == {"layout": {"leaves": [], "skeleton_capacity": 8},
                                                         "nbytes": 16}
    assert client.call("parity_add", payload=memoryview(b"\x02" * 16), index=1, **parity)[0]["need_layout"]
    with pytest.raises(WireError, match="holds no parity of rank 5"):
        client.call("member_layout", rank=5, fp="old", layout={}, nbytes=16)
    assert client.call("inventory")[0]["parity"][0]["k"] == 2
    paths = client.call("register", rank=0, nbytes=64, plan={"fingerprint": "new"})[0]["paths"]
    slot = client.call("begin", rank=0, step=6)[0]["slot"]
    assert paths[slot]
    client.call("complete", rank=0, slot=slot, step=6)
    assert client.call("inventory")[0]["parity"] == []
    with pytest.raises(WireError, match="rank 2 of layout old is not held"):
        client.call("layout", rank=2, fp="old")
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


# ---- hostile bytes ------------------------------------------------------------------------------


def test_a_flood_of_idle_connections_costs_no_threads_and_locks_no_trainer_out(tmp_path):
    k, port, thread = _start(tmp_path, max_pending=64, handshake_timeout_s=1.0)
    threads_before = threading.active_count()
    flood = []
    try:
        for _ in range(300):  # never a byte of handshake from these
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        started = time.monotonic()
        assert _inventory_answers(port, within=5.0)
        assert time.monotonic() - started < 5.0
        assert threading.active_count() - threads_before <= 4  # not one thread per connection
        time.sleep(1.0)  # the handshake timeout: every idle one is closed by the keeper
        assert all(_closed_by_peer(sock, timeout=5.0) for sock in flood)
        assert thread.is_alive()
    finally:
        for sock in flood:
            sock.close()
        _stop(k, thread, port)
    assert not thread.is_alive()


def test_pending_connections_close_oldest_first_when_full_or_stale():
    assert to_close([0.0, 1.0, 2.0], now=2.5, timeout_s=5.0, max_pending=3) == 0
    assert to_close([0.0, 1.0, 2.0, 2.1], now=2.5, timeout_s=5.0, max_pending=3) == 1
    assert to_close([0.0, 1.0, 2.0], now=6.5, timeout_s=5.0, max_pending=3) == 2


def _refusal(frame: bytes, **options) -> str:
    """What `recv` says of `frame` (one fresh socket pair each: a refused frame is left unread)."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(frame)
        with pytest.raises(WireError) as refused:
            recv(b, **options)
    return str(refused.value)


def test_recv_refuses_a_payload_above_its_limit_before_allocating_it():
    header = b'{"op":"parity_add"}'
    tracemalloc.start()
    try:
        said = _refusal(struct.pack("<4sIQ", MAGIC, len(header), 1 << 40) + header, limit=4096)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
    assert f"{1 << 40} bytes exceeds the 4096-byte limit" in said
    frame = struct.pack("<4sIQ", MAGIC, len(header), 64) + header
    assert "64 bytes exceeds the 16-byte limit" in _refusal(frame, into=memoryview(bytearray(16)), limit=1 << 20)
    assert "67108865 bytes exceeds the 67108864-byte cap" in _refusal(struct.pack("<4sIQ", MAGIC, (64 << 20) + 1, 0))
    frame = struct.pack("<4sIQ", MAGIC, len(header), SMALL_PAYLOAD_BYTES + 1) + header
    assert f"exceeds the {SMALL_PAYLOAD_BYTES}-byte limit" in _refusal(frame)  # no limit given: the small default


def test_an_oversized_frame_closes_its_connection_and_the_keeper_serves_on(keeper, thread_errors):
    k, port = keeper
    sock = _authenticated(port)
    header = b'{"op":"inventory"}'
    sock.sendall(struct.pack("<4sIQ", MAGIC, len(header), 1 << 40) + header)
    assert _closed_by_peer(sock)
    sock.close()
    assert _inventory_answers(port) and thread_errors == []


def test_parity_beyond_the_largest_registered_block_is_refused(keeper):
    k, port = keeper
    client = KeeperClient("127.0.0.1", port, SECRET, timeout=5)
    client.call("register", rank=0, nbytes=64, plan={"fingerprint": "f"}, max_block=4 << 20)
    assert k.frame_limit == 4 << 20
    parity = dict(gid=0, j=0, step=1, index=0, members=[0, 1], fp="f", epoch="e")
    with pytest.raises(WireError, match=f"length {(4 << 20) + 1} exceeds this keeper's frame limit"):
        client.call("parity_add", payload=memoryview(b"\x01" * 16), length=(4 << 20) + 1, **parity)
    with pytest.raises(WireError, match="payload of 16 bytes is longer than its length 8"):
        client.call("parity_add", payload=memoryview(b"\x01" * 16), length=8, **parity)
    with pytest.raises(WireError, match="member index 2 is outside"):
        client.call("parity_add", payload=memoryview(b"\x01" * 16), length=16, **{**parity, "index": 2})
    assert k.parity.slots.get((0, 0), []) == [] and client.call("inventory")[0]["parity"] == []
    client.close()


@pytest.mark.parametrize("op,fields,problem", [
    ("nonsense", {}, "unknown keeper operation 'nonsense'"),
    ("begin", {"step": 1}, "'begin' needs the field 'rank'"),
    ("begin", {"rank": "0", "step": 1}, "'begin' field 'rank' must be an integer, not '0'"),
    ("begin", {"rank": True, "step": 1}, "'begin' field 'rank' must be an integer, not True"),
    ("begin", {"rank": -1, "step": 1}, "'begin' field 'rank' must be in 0.."),
    ("begin", {"rank": 0, "step": 1 << 70}, "'begin' field 'step' must be in 0.."),
    ("begin", {"rank": 5, "step": 1}, "'begin': rank 5 is not registered"),
    ("complete", {"rank": 0, "slot": 3, "step": 1}, "'complete' field 'slot' must be in 0..2"),
    ("fetch_parity", {"gid": 0, "j": -1, "step": 1}, "'fetch_parity' field 'j' must be in 0..255"),
    ("parity_add", {"gid": 0, "j": 0, "step": 1, "index": 0, "members": [0, "1"], "length": 4, "fp": "f",
                    "epoch": "e"}, "'parity_add' field 'members' item must be an integer"),
    ("register", {"rank": 0, "nbytes": 64, "plan": []}, "'register' field 'plan' must be a dict"),
    ("persist", {"rank": 0, "step": 1, "storage": 3}, "'persist' field 'storage' must be a str"),
])
def test_a_malformed_request_gets_an_error_naming_the_field_and_the_connection_lives(keeper, op, fields, problem):
    _, port = keeper
    client = KeeperClient("127.0.0.1", port, SECRET, timeout=5)
    with pytest.raises(WireError, match=f"refused '{op}': {problem}"):
        client.call(op, **fields)
    assert client.call("inventory")[0]["node"] == 0  # same connection
    client.close()


@pytest.mark.parametrize("header", [b'{"op": "inventory"', b"[1, 2]", b"\xff\xfe", b'"inventory"'])
def test_a_header_that_is_not_a_json_object_closes_only_its_connection(keeper, thread_errors, header):
    _, port = keeper
    other = KeeperClient("127.0.0.1", port, SECRET, timeout=5)
    sock = _authenticated(port)
    sock.sendall(struct.pack("<4sIQ", MAGIC, len(header), 0) + header)
    assert _closed_by_peer(sock)
    sock.close()
    assert other.call("inventory")[0]["node"] == 0 and thread_errors == []
    other.close()


REQUESTS = [({"op": "register", "rank": 0, "nbytes": 64, "plan": {"fingerprint": "f"}, "max_block": 64}, None),
            ({"op": "begin", "rank": 0, "step": 1}, None),
            ({"op": "complete", "rank": 0, "slot": 0, "step": 1}, None),
            ({"op": "parity_add", "gid": 0, "j": 0, "step": 1, "index": 0, "members": [0, 1], "length": 16,
              "fp": "f", "epoch": "e"}, memoryview(bytes(range(16)))),
            ({"op": "inventory"}, None),
            ({"op": "fetch", "rank": 0, "step": 1}, None)]
FIELDS = sorted({name for header, _ in REQUESTS for name in header})
ODD_LENGTHS = [0, 1, 15, 16, 17, 64 << 20, (64 << 20) + 1, 1 << 31, (1 << 32) - 1, 1 << 40, (1 << 64) - 1]
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(),
                        st.text(max_size=8).filter(lambda t: t != "shutdown"),  # that one ends the keeper
                        st.lists(st.integers(-5, 1 << 21), max_size=4),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _recorded(header: dict, payload) -> bytes:
    """One request frame as `wire.send` writes it."""
    a, b = socket.socketpair()
    with a, b:
        send(a, header, payload)
        a.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: b.recv(65536), b""))


@st.composite
def mutated_streams(draw) -> bytes:
    """`REQUESTS` (in order, or some of them in any order), some with a field set to any JSON value, framed;
    then some length fields rewritten, bytes flipped, the stream cut or extended."""
    every = list(range(len(REQUESTS)))
    frames = []
    for i in draw(st.one_of(st.just(every), st.lists(st.sampled_from(every), min_size=1, max_size=8))):
        header, payload = REQUESTS[i]
        if draw(st.integers(0, 3)) == 0:
            header = {**header, draw(st.sampled_from(FIELDS)): draw(JSON_VALUES)}
        frames.append(bytearray(_recorded(header, payload)))
    for _ in range(draw(st.integers(0, 2))):
        frame = frames[draw(st.integers(0, len(frames) - 1))]
        offset, fmt, top = draw(st.sampled_from([(4, "<I", (1 << 32) - 1), (8, "<Q", (1 << 64) - 1)]))
        value = draw(st.one_of(st.sampled_from([v for v in ODD_LENGTHS if v <= top]), st.integers(0, top)))
        struct.pack_into(fmt, frame, offset, value)
    stream = bytearray(b"".join(frames))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "extend"]))
        if kind == "flip" and stream:
            stream[draw(st.integers(0, len(stream) - 1))] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del stream[draw(st.integers(0, len(stream))):]
        elif kind == "extend":
            stream += draw(st.binary(min_size=1, max_size=64))
    return bytes(stream)


def test_fuzzed_request_streams_leave_the_keeper_serving(tmp_path, thread_errors):
    k, port, thread = _start(tmp_path)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None)
    @given(stream=mutated_streams())
    def keeper_survives(stream):
        sock = _authenticated(port)
        try:
            try:
                sock.sendall(stream)
                sock.shutdown(socket.SHUT_WR)  # the keeper sees the end of the stream, whatever it waits for
            except OSError:
                pass  # already closed by the keeper: a refusal
            assert _closed_by_peer(sock, timeout=5.0), "the keeper kept a finished connection open"
        finally:
            sock.close()
        assert thread.is_alive() and _inventory_answers(port) and thread_errors == []

    try:
        keeper_survives()
    finally:
        _stop(k, thread, port)


def test_discovery_files_are_read_defensively(tmp_path):
    def written(content) -> str:
        path = tmp_path / "node-0.json"
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        return str(path)

    good = {"host": "127.0.0.1", "port": 4242, "pid": os.getpid(), "node": 0}
    assert read_discovery(written(good)) == good
    for bad in [[1, 2], "x", {**good, "port": 0}, {**good, "port": 65536}, {**good, "port": "4242"},
                {**good, "pid": True}, {**good, "pid": -1}, {**good, "pid": 1 << 40}, {**good, "host": 7},
                {**good, "host": ""}, {k: v for k, v in good.items() if k != "host"},
                {**good, "pad": "x" * 5000}, b"\xff\xfe", b"{"]:
        assert read_discovery(written(bad)) is None, bad
    fifo = str(tmp_path / "fifo.json")
    os.mkfifo(fifo)
    assert read_discovery(fifo) is None  # not opened for a blocking read
    assert read_discovery(str(tmp_path / "absent.json")) is None


def test_the_keeper_folders_are_private(keeper, tmp_path):
    for path in (os.path.join(str(tmp_path), "run"), node_dir(str(tmp_path), "run", 0)):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700, path


def test_field_checks_name_the_field():
    spec = {"rank": Field("int", upper=8), "members": Field("ints", count=2), "fp": Field("str", optional=True)}
    assert field_problem("op", {"rank": 7, "members": [1]}, spec) is None
    assert "'rank' must be in 0..7, not 8" in field_problem("op", {"rank": 8, "members": [1]}, spec)
    assert "'members' must be a list of 1 to 2" in field_problem("op", {"rank": 0, "members": [1, 2, 3]}, spec)
    assert "'fp' must be a str" in field_problem("op", {"rank": 0, "members": [0], "fp": None}, spec)
    assert "needs the field 'members'" in field_problem("op", {"rank": 0}, spec)
