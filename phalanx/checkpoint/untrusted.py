"""Readers of the bytes a checkpoint store hands back: nothing in them can run code or make phalanx
allocate more than the files hold, and anything malformed is one `CheckpointRefused` line naming the file.

Storage is shared and long-lived; whoever can write to it can write any bytes. So:
- `manifest.json` is parsed into a fixed schema: only phalanx's own file names (no paths), bounded
  counts and sizes.
- DCP's `.metadata` is a pickle. It is read by a pure-Python unpickler that knows an exact list of
  (module, name) pairs — DCP's metadata dataclasses, `torch.Size`, dtypes — never a module prefix or
  a dotted name, and whose BUILD only fills declared dataclass fields of instances (so no class or
  global can be patched). The result is then checked against the manifest: every stored item lies
  inside a listed file, every tensor's chunks tile it exactly and fit their items, no stream
  transform (a decompressor would be a bomb) is named.
- Each tensor item of a `*.distcp` is a `torch.save` zip; before `torch.load(weights_only=True)` sees
  it, its records must be stored uncompressed and fit the item.
- `rank-R.safetensors`: the header length and every tensor's offsets must lie inside the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import math
import pickle
import re
import zipfile
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)

from phalanx.errors import PhalanxError

FORMAT = "phalanx-checkpoint-1"
MANIFEST = "manifest.json"
METADATA = ".metadata"
MAX_MANIFEST_BYTES = 16 << 20
MAX_WORLD = 1 << 17  # ranks one checkpoint may name; a manifest lists at most two files per rank plus one
MAX_METADATA_BYTES = 1 << 30
MAX_HEADER_BYTES = 100 << 20  # safetensors' own cap on its JSON header
MAX_ZIP_RECORDS = 64  # a torch.save of one tensor or value has about six
FILE_NAME = re.compile(r"^(?:\.metadata|__(\d{1,6})_0\.distcp|rank-(\d{1,6})\.safetensors)$")
DIGEST = re.compile(r"^[0-9a-f]{32}$")


class CheckpointRefused(PhalanxError):
    """A stored checkpoint file is malformed, tampered with or not phalanx's: it is never loaded."""


@contextlib.contextmanager
def reading(where: str) -> Iterator[None]:
    """Any failure while decoding untrusted bytes becomes one line naming `where`."""
    try:
        yield
    except CheckpointRefused:
        raise
    except RecursionError:
        raise CheckpointRefused(f"{where}: nested too deeply to be a phalanx checkpoint file: refused") from None
    except pickle.UnpicklingError as err:
        raise CheckpointRefused(f"{where}: {str(err)[:200]}: refused (phalanx never unpickles arbitrary objects "
                                f"from storage)") from None
    except Exception as err:  # the decoders raise whatever their parsers raise; none of it is trusted
        message = str(err).splitlines()[0][:200] if str(err) else ""
        raise CheckpointRefused(f"{where}: unreadable ({type(err).__name__}: {message}): refused") from None


def _int(value: Any, low: int = 0, high: int = 1 << 62) -> bool:
    return type(value) is int and low <= value <= high


# ---- manifest.json ------------------------------------------------------------------------


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """The manifest as a dict whose every field the loader uses has the right type and range."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise CheckpointRefused(f"{where}: {len(data)} bytes, beyond the {MAX_MANIFEST_BYTES} a manifest may have: "
                                f"refused")
    with reading(where):
        manifest = json.loads(data)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointRefused(f"{where}: not a {FORMAT} manifest: refused")
    world, files = manifest.get("world_size"), manifest.get("files")
    if not _int(manifest.get("step")) or not _int(world, 1, MAX_WORLD):
        raise CheckpointRefused(f"{where}: step {manifest.get('step')!r} or world_size {world!r} out of range: refused")
    if not isinstance(files, dict) or len(files) > 2 * world + 1 or METADATA not in files:
        raise CheckpointRefused(f"{where}: its file list is not a phalanx checkpoint's (at most {2 * world + 1} "
                                f"files, {METADATA} among them): refused")
    for name, entry in files.items():
        match = FILE_NAME.match(name)
        if match is None or any(r is not None and int(r) >= world for r in match.groups()):
            raise CheckpointRefused(f"{where}: lists a file named {name[:80]!r}, which no {world}-rank phalanx "
                                    f"checkpoint writes: refused")
        if not isinstance(entry, dict) or not _int(entry.get("bytes")) or \
                not isinstance(entry.get("blake2b"), str) or not DIGEST.match(entry["blake2b"]):
            raise CheckpointRefused(f"{where}: the size or digest of {name} is malformed: refused")
    if "signature" in manifest and not isinstance(manifest["signature"], dict):
        raise CheckpointRefused(f"{where}: its signature is malformed: refused")
    return manifest


# ---- .metadata ------------------------------------------------------------------------------

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


# ---- *.distcp items and rank-R.safetensors ---------------------------------------------------


def check_torch_item(data: bytes, where: str) -> None:
    """A `torch.save` zip inside an item: stored records that fit the item (torch allocates a record's
    declared size before reading it)."""
    with reading(where):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            records = archive.infolist()
            if len(records) > MAX_ZIP_RECORDS:
                raise CheckpointRefused(f"{where}: {len(records)} records in one item: refused")
            for record in records:
                if record.compress_type != zipfile.ZIP_STORED or record.file_size != record.compress_size or \
                        record.header_offset + record.file_size > len(data):
                    raise CheckpointRefused(f"{where}: a record claims {record.file_size} bytes in an item of "
                                            f"{len(data)}: refused")


def safetensors_skeleton(head: bytes, total: int, where: str) -> bytes:
    """The phalanx skeleton JSON of a rank-local safetensors file of `total` bytes, from its first bytes
    (`head`: at least the 8-byte length and the header), after checking the header's bounds."""
    with reading(where):
        if len(head) < 8 or total < 8:
            raise CheckpointRefused(f"{where}: too short for a safetensors header: refused")
        length = int.from_bytes(head[:8], "little")
        if length > min(total - 8, MAX_HEADER_BYTES) or len(head) < 8 + length:
            raise CheckpointRefused(f"{where}: its header claims {length} bytes in a file of {total}: refused")
        header = json.loads(head[8: 8 + length])
        body = total - 8 - length
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            if not (_int(start) and _int(end) and start <= end <= body):
                raise CheckpointRefused(f"{where}: tensor {name[:80]} lies outside the file: refused")
        meta = header["__metadata__"]
        if meta.get("format") != FORMAT or not isinstance(meta.get("skeleton"), str):
            raise CheckpointRefused(f"{where}: not a {FORMAT} rank file: refused")
        return meta["skeleton"].encode()
