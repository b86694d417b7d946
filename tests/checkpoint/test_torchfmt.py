"""The formats a keeper writes without torch are torch's own: every `torch.save` item matches torch's bytes
(but its serialization id) and loads with `torch.load`, plain and mmapped; values pickle as torch pickles
them; a rank file is what safetensors writes; `.metadata` unpickles to the Metadata DCP's classes build; and
a keeper's whole persist path (write, finalize, retention, signing) leaves torch unloaded."""

from __future__ import annotations

import io
import json
import pickle
import random
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import safetensors.torch
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorProperties, TensorStorageMetadata)

from phalanx.checkpoint import torchfmt
from phalanx.checkpoint.flat import FlatLayout, _decode, _encode, dtype_name, to_dtype
from phalanx.checkpoint.persistent import CheckpointStore, persist_plan
from phalanx.checkpoint.untrusted import check_torch_item
from phalanx.checkpoint.untrusted_metadata import read_metadata
from tests.checkpoint.stored import RANK_LOCAL, equal_states, state_at, template
from tests.helpers import REPO

SHAPES = [(), (5,), (3, 4), (0,), (2, 0, 3)]
SERIALIZATION_ID = "archive/.data/serialization_id"


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def ours(tensor: torch.Tensor) -> bytes:
    return b"".join(torchfmt.tensor_item(dtype_name(tensor.dtype), list(tensor.shape), raw(tensor)))


def torch_saved(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def assert_same_archive(mine: bytes, theirs: bytes) -> None:
    """Same records at the same offsets with the same bytes; only the serialization id (torch hashes its
    records with std::hash) may differ in value."""
    assert len(mine) == len(theirs)
    with zipfile.ZipFile(io.BytesIO(mine)) as a, zipfile.ZipFile(io.BytesIO(theirs)) as b:
        records_a, records_b = a.infolist(), b.infolist()
        assert [(r.filename, r.header_offset, r.file_size, r.flag_bits) for r in records_a] == \
            [(r.filename, r.header_offset, r.file_size, r.flag_bits) for r in records_b]
        for ra, rb in zip(records_a, records_b):
            if ra.filename != SERIALIZATION_ID:
                assert a.read(ra) == b.read(rb), ra.filename
                assert ra.CRC == rb.CRC
    differing = [i for i in range(len(mine)) if mine[i] != theirs[i]]
    start = theirs.index(SERIALIZATION_ID.encode())  # the id's record, its descriptor and its directory entry
    assert all(i > start for i in differing)


def example(dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """A tensor of `dtype` and `shape` with random bytes (bools 0 or 1)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
    data = np.random.default_rng(len(shape)).integers(0, 2 if dtype == torch.bool else 256, nbytes, dtype=np.uint8)
    tensor = torch.empty(shape, dtype=dtype)  # contiguous strides, as a snapshot's views have
    tensor.reshape(-1).view(torch.uint8).copy_(torch.from_numpy(data))
    return tensor


@pytest.mark.parametrize("dtype", list(torchfmt.DTYPES))
def test_tensor_items_are_torch_saves_bytes_and_load(dtype):
    for shape in SHAPES:
        tensor = example(to_dtype(dtype), shape)
        mine = ours(tensor)
        assert_same_archive(mine, torch_saved(tensor.clone()))
        check_torch_item(mine, "item")
        loaded = torch.load(io.BytesIO(mine), weights_only=True)
        assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape
        assert raw(loaded) == raw(tensor), (dtype, shape)


def test_a_non_contiguous_source_is_written_contiguous_and_loads_mmapped(tmp_path):
    source = torch.arange(24, dtype=torch.float32).reshape(4, 6)[:, 1:5].t()
    assert not source.is_contiguous()
    for tensor in (source, source.to(torch.bfloat16), torch.arange(7, dtype=torch.int64), torch.tensor(3.5)):
        path = tmp_path / "item.pt"
        path.write_bytes(ours(tensor))
        loaded = torch.load(path, weights_only=True, mmap=True)
        assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor.contiguous())


def test_an_unknown_dtype_is_refused_by_name():
    with pytest.raises(Exception, match="quint8"):
        torchfmt.tensor_item("quint8", [1], b"\0")


VALUES = [3, 2**40, -7, 1.5, float("inf"), "text", "", None, True, False, [1, (2, 3.0)], {"a": [1, {"b": None}]},
          random.Random(3).getstate(), torch.bfloat16, [torch.float32, torch.float32], (), [], {},
          np.arange(6, dtype=np.int32).reshape(2, 3)]


@pytest.mark.parametrize("value", VALUES, ids=[type(v).__name__ + str(i) for i, v in enumerate(VALUES)])
def test_values_pickle_as_torch_pickles_them_and_load(value):
    encoded = json.loads(json.dumps(_encode(value)))  # what a snapshot's skeleton holds
    mine = b"".join(torchfmt.value_item(torchfmt.decode(encoded)))
    assert_same_archive(mine, torch_saved(_decode(encoded)))
    if not isinstance(value, np.ndarray):  # an array needs torch's numpy allow-list; its bytes are torch's
        assert equal_states(torch.load(io.BytesIO(mine), weights_only=True), _decode(encoded))


def test_rank_files_are_what_safetensors_writes():
    tensors = {"rng.torch": torch.arange(17, dtype=torch.uint8), "b": torch.randn(3, 2), "z": torch.zeros(0),
               "a": torch.randn(2).to(torch.bfloat16), "é": torch.ones(2, dtype=torch.float64)}
    tensors.update({f"x.{d}": example(to_dtype(d), (3,)) for d in torchfmt.SAFETENSORS_DTYPES})
    metadata = {"skeleton": json.dumps({"values": {"a\n": "ü\x01"}}), "format": "phalanx-checkpoint-1"}
    mine = b"".join(torchfmt.safetensors_bytes(
        {k: (dtype_name(v.dtype), list(v.shape), raw(v)) for k, v in tensors.items()}, metadata))
    theirs = safetensors.torch.save(tensors, metadata=metadata)

    def parts(data: bytes) -> tuple[dict, bytes]:
        length = int.from_bytes(data[:8], "little")
        return json.loads(data[8: 8 + length]), data[8 + length:]

    assert len(mine) == len(theirs) and parts(mine) == parts(theirs)  # its metadata map has no fixed order
    loaded = safetensors.torch.load(mine)
    assert all(raw(loaded[k]) == raw(v) and loaded[k].dtype == v.dtype for k, v in tensors.items())


def records() -> list[dict]:
    """Results records of two ranks: a tensor in two chunks, whole tensors of several dtypes, values."""
    def tensor(fqn: str, dtype: str, size: list[int], offsets: list[int], lengths: list[int], at: int) -> dict:
        return {"fqn": fqn, "path": fqn.split("."), "kind": "tensor", "dtype": dtype, "size": size,
                "offsets": offsets, "lengths": lengths, "file": "__0_0.distcp", "offset": at, "length": 900}

    first = [tensor("model.w", "float32", [8, 4], [0, 0], [4, 4], 0), tensor("model.b", "bfloat16", [4], [0], [4], 900),
             tensor("optim.step", "int64", [], [], [], 1800),
             {"fqn": "step", "path": ["step"], "kind": "bytes", "file": "__0_0.distcp", "offset": 2700, "length": 700}]
    second = [dict(tensor("model.w", "float32", [8, 4], [4, 0], [4, 4], 0), file="__1_0.distcp"),
              {"fqn": "optim.param_groups.0.betas", "path": ["optim", "param_groups", 0, "betas"], "kind": "bytes",
               "file": "__1_0.distcp", "offset": 900, "length": 700}]
    return [{"items": first}, {"items": second}]


def metadata_as_dcp_builds_it(records: list[dict]) -> Metadata:
    """The Metadata phalanx built with DCP's own classes before its keepers stopped loading torch."""
    state_meta, storage, paths = {}, {}, {}
    for record in records:
        for item in record["items"]:
            paths[item["fqn"]] = tuple(item["path"])
            info = _StorageInfo(item["file"], item["offset"], item["length"])
            if item["kind"] == "bytes":
                state_meta[item["fqn"]] = BytesStorageMetadata()
                storage[MetadataIndex(item["fqn"])] = info
                continue
            meta = state_meta.setdefault(item["fqn"], TensorStorageMetadata(
                TensorProperties(dtype=to_dtype(item["dtype"])), torch.Size(item["size"]), []))
            meta.chunks.append(ChunkStorageMetadata(torch.Size(item["offsets"]), torch.Size(item["lengths"])))
            storage[MetadataIndex(item["fqn"], torch.Size(item["offsets"]))] = info
    return Metadata(state_dict_metadata=state_meta, planner_data=paths, storage_data=storage)


def test_metadata_unpickles_to_what_dcp_builds_with_the_stock_and_the_restricted_unpickler():
    data = torchfmt.metadata_pickle(records())
    expected = metadata_as_dcp_builds_it(records())
    assert pickle.loads(data) == expected
    assert pickle.loads(data).storage_data == expected.storage_data  # keys hash as DCP's: lookups work
    assert read_metadata(data, {"__0_0.distcp": 3400, "__1_0.distcp": 1600, ".metadata": len(data)}, "m") == expected
    assert len(data) <= len(pickle.dumps(expected)) * 1.1


WRITER = """
import json, sys
from pathlib import Path
from phalanx.checkpoint.persistent import CheckpointStore
from phalanx.checkpoint.signing import signing_key
work = Path(sys.argv[1])
plan = json.loads((work / "plan.json").read_text())
store = CheckpointStore(str(work / "checkpoints"), key=signing_key(b"s" * 32))
for step in (1, 2, 3):
    block = memoryview(bytearray((work / f"block-{step}.bin").read_bytes()))
    store.write_rank(step, 0, block, plan)
    store.finalize(step, 1, timeout_s=30, keep_last=2, info={"run": "t"})
assert store.committed_steps() == [2, 3], store.committed_steps()
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "safetensors.torch")))
print(json.dumps(loaded))
"""


def test_a_keeper_persists_signs_and_retains_without_torch_and_the_checkpoint_loads(tmp_path):
    for step in (1, 2, 3):
        state = state_at(step)
        layout = FlatLayout.of(state)
        block = torch.zeros(layout.nbytes, dtype=torch.uint8)
        layout.pack(block, state)
        (tmp_path / f"block-{step}.bin").write_bytes(block.numpy().tobytes())
    plan = persist_plan(state_at(3), FlatLayout.of(state_at(3)), RANK_LOCAL, 0, lambda obj: [obj])
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    done = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []

    from phalanx.checkpoint.signing import signing_key

    store = CheckpointStore(str(tmp_path / "checkpoints"), key=signing_key(b"s" * 32))
    assert store.verify(3) == []
    assert equal_states(store.load(3, template(), 0, 1, RANK_LOCAL), state_at(3))
    shared = {k: v for k, v in template().items() if k not in RANK_LOCAL}
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(shared, checkpoint_id=store.path(3))  # plain DCP, its own reader and planner
    expected = state_at(3)
    assert equal_states(shared["model"], expected["model"]) and equal_states(shared["optim"], expected["optim"])
    assert shared["step"] == 3


def test_a_chunk_too_large_for_plain_zip_records_is_written_by_torch(monkeypatch):
    tensor = example(torch.bfloat16, (40, 3))
    monkeypatch.setattr(torchfmt, "ZIP64_LIMIT", 200)  # as if these 240 bytes were 4 GiB
    mine = b"".join(torchfmt.tensor_item("bfloat16", [40, 3], bytearray(raw(tensor))))  # a slot is writable
    assert_same_archive(mine, torch_saved(tensor))
    assert torch.equal(torch.load(io.BytesIO(mine), weights_only=True), tensor)
