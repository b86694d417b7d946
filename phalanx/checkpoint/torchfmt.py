"""The bytes `torch.save` and DCP's metadata pickle hold, written without importing torch.

A keeper persists snapshots it already holds as raw bytes; loading torch only to wrap them in torch's
own containers would cost every keeper seconds of CPU. What torch writes for them is small and fixed:
a `torch.save` item is a zip of stored (uncompressed) records — `data.pkl`, a protocol-2 pickle
that rebuilds the tensor from a persistent storage reference, then `.format_version`, `.storage_alignment`,
`byteorder`, `data/0` (the raw bytes), `version`, `.data/serialization_id` — each record's data starting
on a 64-byte boundary (padding in a zip extra field named `FB`), which is what lets `torch.load(mmap=True)`
map it. DCP's `.metadata` is a pickle of its dataclasses. Both are emitted here by Python's pure-Python
pickler with stand-ins (`Global`, `Reduced`, `Instance`) for torch's classes and functions, so the
pickles name them without importing them. Tests compare every byte (but the serialization id) with
torch's own output, and the unpickled metadata with the one DCP's classes build.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import pickle
import struct
import zlib
from collections import OrderedDict
from typing import Any, Optional, Union

from phalanx.errors import PhalanxError

Buffer = Union[bytes, memoryview]

# dtype name -> (the typed storage class torch pickles it with, or None for an untyped one, bytes per element)
DTYPES: dict[str, tuple[Optional[str], int]] = {
    "uint8": ("ByteStorage", 1), "int8": ("CharStorage", 1), "int16": ("ShortStorage", 2),
    "int32": ("IntStorage", 4), "int64": ("LongStorage", 8), "float16": ("HalfStorage", 2),
    "float32": ("FloatStorage", 4), "float64": ("DoubleStorage", 8), "bfloat16": ("BFloat16Storage", 2),
    "bool": ("BoolStorage", 1), "complex64": ("ComplexFloatStorage", 8), "complex128": ("ComplexDoubleStorage", 16),
    # dtypes newer than typed storages: torch saves an untyped storage and names the dtype (_rebuild_tensor_v3)
    "complex32": (None, 4), "uint16": (None, 2), "uint32": (None, 4), "uint64": (None, 8),
    "float8_e5m2": (None, 1), "float8_e4m3fn": (None, 1), "float8_e5m2fnuz": (None, 1),
    "float8_e4m3fnuz": (None, 1), "float8_e8m0fnu": (None, 1), "float4_e2m1fn_x2": (None, 1),
}
ALIGNMENT = 64  # torch's storage alignment (torch.utils.serialization.config.save.storage_alignment)
ZIP64_LIMIT = 0xFFFFFFFF  # a record, or an offset, at this size needs zip64 fields: torch writes those items
_DCP = "torch.distributed.checkpoint.metadata"


def dtype_entry(name: str) -> tuple[Optional[str], int]:
    """(storage class, element size) of dtype `name`; PhalanxError for a dtype this writer does not know."""
    try:
        return DTYPES[name]
    except KeyError:
        raise PhalanxError(f"tensor dtype '{name}' cannot be persisted by a keeper (it writes "
                           f"{', '.join(DTYPES)}); cast that state to one of them") from None


# ---- stand-ins: what a pickle names, without the module that defines it ---------------------


class Global:
    """`module.name`, pickled as a reference (GLOBAL / STACK_GLOBAL); one instance per name, so repeated
    references are memoized as pickle memoizes a class or a dtype."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


@functools.lru_cache(maxsize=None)
def ref(module: str, name: str) -> Global:
    """The one `Global` of `module.name`."""
    return Global(module, name)


class Reduced:
    """`func(*args)` (REDUCE): torch.Size, a layout, an enum member."""

    __slots__ = ("func", "args")

    def __init__(self, func: Global, args: tuple):
        self.func, self.args = func, args


class Instance:
    """`cls.__new__(cls)` with `state` (NEWOBJ, BUILD): a dataclass instance, as `object.__reduce_ex__` pickles it."""

    __slots__ = ("cls", "state")

    def __init__(self, cls: Global, state: Any):
        self.cls, self.state = cls, state


class _Storage:
    """A tensor's storage, pickled as torch's persistent id for record `data/0`."""

    __slots__ = ("pid",)

    def __init__(self, pid: tuple):
        self.pid = pid


class _Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table takes the stand-ins
    dispatch = dict(pickle._Pickler.dispatch)

    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if type(obj) is _Storage else None

    def save_global_ref(self, obj: Global) -> None:
        if self.proto >= 4:
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
        self.memoize(obj)

    def save_reduced(self, obj: Reduced) -> None:
        self.save(obj.func)
        self.save(obj.args)
        self.write(pickle.REDUCE)
        self.memoize(obj)

    def save_instance(self, obj: Instance) -> None:
        self.save(obj.cls)
        self.save(())
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        if obj.state is not None:
            self.save(obj.state)
            self.write(pickle.BUILD)

    dispatch[Global] = save_global_ref
    dispatch[Reduced] = save_reduced
    dispatch[Instance] = save_instance


def dumps(obj: Any, protocol: int = pickle.DEFAULT_PROTOCOL) -> bytes:
    """A pickle of `obj`, whose stand-ins become the references, calls and instances they stand for."""
    out = io.BytesIO()
    _Pickler(out, protocol).dump(obj)
    return out.getvalue()


# ---- torch.save ----------------------------------------------------------------------------


def tensor_item(dtype: str, shape: list[int], data: Buffer) -> list[Buffer]:
    """The bytes of `torch.save(t)` for a contiguous CPU tensor `t` of `dtype` and `shape` whose elements are
    `data`, as pieces to write in order (`data` itself is one of them: it is not copied)."""
    storage, itemsize = dtype_entry(dtype)
    numel = 1
    for d in shape:
        numel *= d
    if len(data) != numel * itemsize:
        raise PhalanxError(f"a {dtype} tensor of shape {list(shape)} has {numel * itemsize} bytes, not {len(data)}")
    if len(data) + 4096 >= ZIP64_LIMIT:  # 4096: more than the other records and headers of an item take
        return [_saved_by_torch(dtype, shape, data)]
    stride, step = [], 1
    for d in reversed(shape):
        stride.append(step)
        step *= max(d, 1)
    size, strides = tuple(shape), tuple(reversed(stride))
    if storage is None:  # torch._utils._rebuild_tensor_v3(storage, offset, size, stride, grad, hooks, dtype)
        pid = ("storage", ref("torch.storage", "UntypedStorage"), "0", "cpu", len(data))
        args: tuple = (_Storage(pid), 0, size, strides, False, OrderedDict(), ref("torch", dtype))
        rebuild = ref("torch._utils", "_rebuild_tensor_v3")
    else:
        pid = ("storage", ref("torch", storage), "0", "cpu", numel)
        args = (_Storage(pid), 0, size, strides, False, OrderedDict())
        rebuild = ref("torch._utils", "_rebuild_tensor_v2")
    return _archive(dumps(Reduced(rebuild, args), protocol=2), data)


def _saved_by_torch(dtype: str, shape: list[int], data: Buffer) -> bytes:
    """`torch.save`'s own bytes, for a chunk of 4 GiB or more (the one case that loads torch)."""
    import torch

    buffer = io.BytesIO()
    torch.save(torch.frombuffer(data, dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape).clone(), buffer)
    return buffer.getvalue()


def value_item(value: Any) -> list[Buffer]:
    """The bytes of `torch.save(value)` for a plain value (`decode` of its skeleton JSON)."""
    return _archive(dumps(value, protocol=2), None)


def decode(value: Any) -> Any:
    """A skeleton JSON value (`flat._encode`) as the value `flat._decode` rebuilds, dtypes as stand-ins."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(decode(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: decode(v) for k, v in value["__dict__"].items()}
    if "__ndarray__" in value:
        import base64

        import numpy as np

        array = np.frombuffer(base64.b64decode(value["data"]), dtype=np.dtype(value["__ndarray__"]))
        return array.reshape(value["shape"]).copy()
    if "__dtype__" in value:
        dtype_entry(value["__dtype__"])
        return ref("torch", value["__dtype__"])
    raise PhalanxError(f"unreadable value {str(value)[:80]} in a checkpoint skeleton")


def _archive(pickled: bytes, data: Optional[Buffer]) -> list[Buffer]:
    """torch.save's zip around `pickled` and, for a tensor, its storage `data`."""
    records: list[tuple[str, Buffer]] = [("data.pkl", pickled), (".format_version", b"1"),
                                         (".storage_alignment", str(ALIGNMENT).encode()), ("byteorder", b"little")]
    if data is not None:
        records.append(("data/0", data))
    records.append(("version", b"3\n"))
    crcs = [zlib.crc32(payload) for _, payload in records]
    # torch derives the id from the records' CRCs and names; any 40 digits load the same
    seed = hashlib.blake2b(repr([name for name, _ in records]).encode() + struct.pack(f"<{len(crcs)}I", *crcs),
                           digest_size=16).digest()
    records.append((".data/serialization_id", f"{int.from_bytes(seed, 'little') % 10 ** 40:040d}".encode()))
    crcs.append(zlib.crc32(records[-1][1]))
    pieces: list[Buffer] = []
    central, position = [], 0
    for (name, payload), crc in zip(records, crcs):
        full = f"archive/{name}".encode()
        start = position + 30 + len(full) + 4
        padding = -start % ALIGNMENT
        # sizes and CRC follow the data in a descriptor (flag 0x8), except after an empty record; names are UTF-8
        flags, descriptor = (0x808, struct.pack("<4sIII", b"PK\x07\x08", crc, len(payload), len(payload))) \
            if len(payload) else (0x800, b"")
        if start + padding + len(payload) + len(descriptor) >= ZIP64_LIMIT:
            raise PhalanxError(f"a tensor of {len(payload)} bytes needs zip64 records, which only torch.save writes")
        header = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 0, flags, 0, 0, 0, 0, 0, 0, len(full), 4 + padding)
        pieces += [header + full + b"FB" + struct.pack("<H", padding) + b"Z" * padding, payload, descriptor]
        central.append(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0, 0, flags, 0, 0, 0, crc, len(payload),
                                   len(payload), len(full), 0, 0, 0, 0, 0, position) + full)
        position = start + padding + len(payload) + len(descriptor)
    directory = b"".join(central)
    end = position + len(directory)
    count = len(records)
    pieces.append(directory
                  + struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 0x031E, 45, 0, 0, count, count, len(directory),
                                position)
                  + struct.pack("<4sIQI", b"PK\x06\x07", 0, end, 1)
                  + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, len(directory), position, 0))
    return pieces


# ---- safetensors ---------------------------------------------------------------------------

# dtype name -> safetensors' name, in the order of safetensors' dtype enum (it writes the greatest first);
# only those `safetensors.torch.load` reads back
SAFETENSORS_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "float8_e5m2": "F8_E5M2", "float8_e4m3fn": "F8_E4M3",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "int16": "I16", "uint16": "U16", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "uint32": "U32",
    "float32": "F32", "complex64": "C64", "float64": "F64", "int64": "I64", "uint64": "U64",
}
_SAFETENSORS_RANK = {name: i for i, name in enumerate(SAFETENSORS_DTYPES)}


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], Buffer]], metadata: dict[str, str]) -> list[Buffer]:
    """A safetensors file of `tensors` (name -> (dtype, shape, bytes)), as `safetensors.torch.save` lays it
    out: an 8-byte header length, the JSON header padded with spaces to 8 bytes, then the data by dtype and
    name."""
    for name, (dtype, _, _) in tensors.items():
        if dtype not in SAFETENSORS_DTYPES:
            raise PhalanxError(f"rank-local tensor {name} is {dtype}, which a safetensors file cannot hold")
    order = sorted(tensors, key=lambda name: (-_SAFETENSORS_RANK[tensors[name][0]], name))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    position = 0
    for name in order:
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [position, position + len(data)]}
        position += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return [struct.pack("<Q", len(text)) + text, *(tensors[name][2] for name in order)]


# ---- DCP's .metadata -----------------------------------------------------------------------


def _size(dims: list[int]) -> Reduced:
    return Reduced(ref("torch", "Size"), (tuple(dims),))


@functools.lru_cache(maxsize=None)
def _properties_constants() -> tuple[Reduced, Reduced]:
    """torch.strided and DCP's contiguous memory format: one object each, as pickle sees torch's singletons."""
    return (Reduced(ref("torch.serialization", "_get_layout"), ("torch.strided",)),
            Reduced(ref(_DCP, "_MEM_FORMAT_ENCODING"), (0,)))


def metadata_pickle(records: list[dict[str, Any]]) -> bytes:
    """DCP's `.metadata` (a pickled `Metadata`) for the items of every rank's results record."""
    layout, memory_format = _properties_constants()
    state_meta: dict[str, Instance] = {}
    storage: dict[Instance, Instance] = {}
    paths: dict[str, tuple] = {}  # fqn -> path in the nested state: DCP's planner_data, for unflattening
    for record in records:
        for item in record["items"]:
            fqn = item["fqn"]
            paths[fqn] = tuple(item["path"])
            info = Instance(ref("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                            {"relative_path": item["file"], "offset": item["offset"], "length": item["length"],
                             "transform_descriptors": None})
            if item["kind"] == "bytes":
                state_meta[fqn] = Instance(ref(_DCP, "BytesStorageMetadata"), None)
                storage[Instance(ref(_DCP, "MetadataIndex"), {"fqn": fqn, "index": None})] = info
                continue
            dtype_entry(item["dtype"])
            if fqn not in state_meta:
                properties = Instance(ref(_DCP, "TensorProperties"),
                                      (ref("torch", item["dtype"]), layout, False, memory_format, False))
                state_meta[fqn] = Instance(ref(_DCP, "TensorStorageMetadata"),
                                           {"properties": properties, "size": _size(item["size"]), "chunks": []})
            chunk = Instance(ref(_DCP, "ChunkStorageMetadata"),
                             {"offsets": _size(item["offsets"]), "sizes": _size(item["lengths"])})
            state_meta[fqn].state["chunks"].append(chunk)
            index = Instance(ref(_DCP, "MetadataIndex"), {"fqn": fqn, "index": None, "offset": _size(item["offsets"])})
            storage[index] = info
    return dumps(Instance(ref(_DCP, "Metadata"), {"state_dict_metadata": state_meta, "planner_data": paths,
                                                  "storage_data": storage, "storage_meta": None, "version": None}))
