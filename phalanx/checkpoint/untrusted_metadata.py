"""DCP's `.metadata` read from storage: a pickle, so read by a pure-Python unpickler that knows an exact
list of (module, name) pairs — DCP's metadata dataclasses, `torch.Size`, dtypes — never a module prefix or
a dotted name, and whose BUILD only fills declared dataclass fields of instances (so no class or global can
be patched). The result is then checked against the manifest: every stored item lies inside a listed file,
every tensor's chunks tile it exactly and fit their items, no stream transform (a decompressor would be a
bomb) is named. (The rest of what storage hands back, read without torch: `untrusted.py`.)
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import math
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)

from phalanx.checkpoint.untrusted import MAX_METADATA_BYTES, METADATA, CheckpointRefused, _int, reading

_DCP = "torch.distributed.checkpoint.metadata"
_BUILDABLE = (Metadata, MetadataIndex, TensorStorageMetadata, BytesStorageMetadata, ChunkStorageMetadata,
              TensorProperties, StorageMeta, _StorageInfo)
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(cls.__module__, cls.__qualname__): cls for cls in _BUILDABLE},
    (_DCP, "_MEM_FORMAT_ENCODING"): importlib.import_module(_DCP)._MEM_FORMAT_ENCODING,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
}


class _MetadataUnpickler(pickle._Unpickler):  # the pure-Python one: its BUILD can be restricted
    """DCP metadata and nothing else: exact (module, name) pairs; BUILD only on instances of DCP's
    dataclasses, only their declared fields."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(f"it names {str(module)[:60]}.{str(name)[:60]}, which is not DCP "
                                         f"metadata") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it holds a persistent reference, which DCP metadata never does")

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        cls = type(inst)
        if cls not in _BUILDABLE:
            raise pickle.UnpicklingError(f"it sets the state of a {cls.__name__[:60]}, which is not DCP metadata")
        if cls is TensorProperties:  # its own __setstate__ takes a 5-tuple
            if not (isinstance(state, tuple) and len(state) == 5):
                raise pickle.UnpicklingError("a TensorProperties state is not DCP's")
            inst.__setstate__(state)
            return
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(state, dict) or not all(isinstance(k, str) and k in names for k in state):
            raise pickle.UnpicklingError(f"it sets fields of {cls.__name__} that the class does not declare")
        inst.__dict__.update(state)

    dispatch[pickle.BUILD[0]] = load_build


def read_metadata(data: bytes, files: dict[str, int], where: str) -> Metadata:
    """DCP metadata from `.metadata` bytes, checked against `files` (name -> size) of its manifest."""
    if len(data) > MAX_METADATA_BYTES:
        raise CheckpointRefused(f"{where}: {len(data)} bytes, beyond the {MAX_METADATA_BYTES} phalanx reads: refused")
    with reading(where):
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    with reading(where):
        _check_metadata(metadata, files, where)
    return metadata


def _shape(value: Any) -> bool:
    return isinstance(value, torch.Size) and len(value) <= 64 and all(_int(d) for d in value)


def _check_metadata(metadata: Any, files: dict[str, int], where: str) -> None:
    def refuse(what: str) -> CheckpointRefused:
        return CheckpointRefused(f"{where}: {what}: refused")

    if type(metadata) is not Metadata or not isinstance(metadata.state_dict_metadata, dict) or \
            not isinstance(metadata.storage_data, dict):
        raise refuse("not DCP metadata")
    storage: dict[tuple[str, Any], int] = {}  # (fqn, offsets or None) -> item length
    for index, info in metadata.storage_data.items():
        if type(index) is not MetadataIndex or type(info) is not _StorageInfo or not isinstance(index.fqn, str):
            raise refuse("a storage entry is not DCP's")
        if not (index.offset is None or _shape(index.offset)):
            raise refuse(f"the storage entry of {index.fqn[:80]} has a malformed offset")
        if info.relative_path not in files or info.relative_path == METADATA:
            raise refuse(f"{index.fqn[:80]} is stored in {str(info.relative_path)[:80]!r}, which the manifest "
                         f"does not list")
        if not _int(info.offset) or not _int(info.length) or info.offset + info.length > files[info.relative_path]:
            raise refuse(f"{index.fqn[:80]} lies outside {info.relative_path} ({files[info.relative_path]} bytes)")
        if info.transform_descriptors is not None:
            raise refuse(f"{index.fqn[:80]} names stream transforms, which phalanx never writes")
        storage[(index.fqn, None if index.offset is None else tuple(index.offset))] = info.length
    for fqn, meta in metadata.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise refuse("a state key is not a string")
        if type(meta) is BytesStorageMetadata:
            if (fqn, None) not in storage:
                raise refuse(f"the value {fqn[:80]} has no storage entry")
            continue
        if type(meta) is not TensorStorageMetadata or type(meta.properties) is not TensorProperties or \
                not isinstance(meta.properties.dtype, torch.dtype) or not _shape(meta.size) or \
                not isinstance(meta.chunks, list):
            raise refuse(f"the entry of {fqn[:80]} is not DCP tensor metadata")
        itemsize = torch.empty((), dtype=meta.properties.dtype).element_size()
        covered = 0
        for chunk in meta.chunks:
            if type(chunk) is not ChunkStorageMetadata or not _shape(chunk.offsets) or not _shape(chunk.sizes) or \
                    len(chunk.offsets) != len(meta.size) or len(chunk.sizes) != len(meta.size) or \
                    any(o + s > d for o, s, d in zip(chunk.offsets, chunk.sizes, meta.size)):
                raise refuse(f"a chunk of {fqn[:80]} lies outside its tensor of shape {list(meta.size)}")
            length = storage.get((fqn, tuple(chunk.offsets)))
            if length is None:
                raise refuse(f"a chunk of {fqn[:80]} has no storage entry")
            numel = math.prod(chunk.sizes)
            if numel * itemsize > length:
                raise refuse(f"a chunk of {fqn[:80]} claims {numel * itemsize} bytes in an item of {length}")
            covered += numel
        if covered != math.prod(meta.size):
            raise refuse(f"the chunks of {fqn[:80]} do not tile its shape {list(meta.size)}")
    planner = metadata.planner_data
    if planner is not None and not (isinstance(planner, dict) and all(
            isinstance(k, str) and isinstance(v, tuple) and all(isinstance(p, (str, int)) for p in v)
            for k, v in planner.items())):
        raise refuse("its state paths are not DCP's")
