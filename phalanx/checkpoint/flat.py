"""A Trainer state as a fixed tensor layout plus a JSON skeleton — the unit every checkpoint tier moves.

`flatten_state_dict` (torch DCP's own) turns the nested state into `fqn -> leaf` with DCP's names, so
a snapshot block, a rank-local safetensors file and a DCP shard all speak of the same keys. Tensor
leaves (DTensors by their local shard) get fixed, aligned offsets in one byte region, computed once
per run; everything else (step, LR schedule, data position, Python/NumPy RNG) goes into a JSON
skeleton with explicit tuple and array markers. Nothing is pickled: a block or file read back can
only produce tensors and JSON values. Objects JSON cannot hold (DeepSpeed's loss scaler) are marked
and taken from the freshly built trainer's own state on restore.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict
from typing import Any, Optional

import numpy as np
import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.tensor import DTensor

from phalanx.checkpoint.leaves import ALIGN, HEADER, LeafMeta
from phalanx.errors import PhalanxError


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise PhalanxError(f"unknown tensor dtype '{name}' in a checkpoint; it was written by another torch version?")
    return dtype


def local_chunk(value: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """(local tensor, global shape, global offset of the local chunk)."""
    if isinstance(value, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        return value.to_local(), list(value.shape), list(offset)
    return value, list(value.shape), [0] * value.dim()


def _encode(value: Any) -> Any:
    """A JSON-able form of a non-tensor leaf; tuples and arrays keep their type."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_encode(v) for v in value]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": str(value.dtype), "shape": list(value.shape),
                "data": base64.b64encode(np.ascontiguousarray(value).tobytes()).decode()}
    if isinstance(value, np.generic):
        return _encode(value.item())
    if isinstance(value, torch.dtype):
        return {"__dtype__": dtype_name(value)}
    return {"__template__": type(value).__qualname__}


def _decode(value: Any, template: Any = None) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _decode(v) for k, v in value["__dict__"].items()}
    if "__ndarray__" in value:
        array = np.frombuffer(base64.b64decode(value["data"]), dtype=np.dtype(value["__ndarray__"]))
        return array.reshape(value["shape"]).copy()
    if "__dtype__" in value:
        return to_dtype(value["__dtype__"])
    if "__template__" in value:
        if type(template).__qualname__ != value["__template__"]:
            raise PhalanxError(f"a checkpointed {value['__template__']} cannot be rebuilt: the new trainer holds "
                               f"{type(template).__qualname__} at that key; resume with the same configuration")
        return template
    raise PhalanxError(f"unreadable value {str(value)[:80]} in a checkpoint skeleton")


class FlatLayout:
    """The tensor layout of one rank's state (fixed for a run) and how to pack and unpack it."""

    def __init__(self, leaves: list[LeafMeta], skeleton_capacity: int):
        self.leaves = leaves
        self.skeleton_capacity = skeleton_capacity  # bytes reserved at the start of a block for the JSON
        self.tensor_bytes = leaves[-1].offset + leaves[-1].nbytes if leaves else 0
        self.nbytes = HEADER + skeleton_capacity + self.tensor_bytes
        self._key = [(leaf.fqn, leaf.dtype, tuple(leaf.shape)) for leaf in leaves]

    @classmethod
    def of(cls, state: dict[str, Any]) -> "FlatLayout":
        flat, _ = flatten_state_dict(state)
        leaves, offset = [], 0
        for fqn, value in flat.items():
            if isinstance(value, torch.Tensor):
                local, global_shape, global_offset = local_chunk(value)
                nbytes = local.numel() * local.element_size()
                leaves.append(LeafMeta(fqn, dtype_name(local.dtype), list(local.shape), offset, nbytes,
                                       global_shape, global_offset))
                offset += -(-nbytes // ALIGN) * ALIGN
        skeleton = len(_skeleton_json(state, flat, _mapping(state)))
        return cls(leaves, max(64 * 1024, -(-4 * skeleton // ALIGN) * ALIGN))

    def matches(self, state: dict[str, Any]) -> bool:
        flat, _ = flatten_state_dict(state)
        key = [(fqn, dtype_name(local_chunk(v)[0].dtype), tuple(local_chunk(v)[0].shape))
               for fqn, v in flat.items() if isinstance(v, torch.Tensor)]
        return key == self._key

    def to_json(self) -> dict[str, Any]:
        return {"leaves": [asdict(leaf) for leaf in self.leaves], "skeleton_capacity": self.skeleton_capacity}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FlatLayout":
        return cls([LeafMeta(**leaf) for leaf in data["leaves"]], data["skeleton_capacity"])

    # ---- packing ---------------------------------------------------------------------------

    def views(self, block: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of each leaf inside a uint8 block of `self.nbytes` (no copy)."""
        base = HEADER + self.skeleton_capacity
        out = []
        for leaf in self.leaves:
            raw = block[base + leaf.offset: base + leaf.offset + leaf.nbytes]
            out.append(raw.view(to_dtype(leaf.dtype)).view(leaf.shape))
        return out

    def write_skeleton(self, block: torch.Tensor, state: dict[str, Any]) -> None:
        flat, mapping = flatten_state_dict(state)
        self.write_skeleton_bytes(block, _skeleton_json(state, flat, mapping))

    def write_skeleton_bytes(self, block: torch.Tensor, data: bytes) -> None:
        if len(data) > self.skeleton_capacity:
            raise PhalanxError(f"the non-tensor state grew to {len(data)} bytes, beyond the {self.skeleton_capacity} "
                               f"reserved; restart the run so the snapshot layout is measured again")
        header = np.frombuffer(len(data).to_bytes(HEADER, "little") + data, dtype=np.uint8)
        block[: header.size].copy_(torch.from_numpy(header.copy()))

    def tensors(self, state: dict[str, Any]) -> list[torch.Tensor]:
        """The local tensors of `state`, in layout order (the sources of a snapshot copy)."""
        flat, _ = flatten_state_dict(state)
        return [local_chunk(v)[0] for v in flat.values() if isinstance(v, torch.Tensor)]

    def pack(self, block: torch.Tensor, state: dict[str, Any]) -> None:
        """Synchronous copy of `state` into `block` (the asynchronous path copies `tensors()` itself)."""
        self.write_skeleton(block, state)
        for view, tensor in zip(self.views(block), self.tensors(state)):
            view.copy_(tensor.detach())

    def skeleton_json(self, block: torch.Tensor) -> bytes:
        """The JSON skeleton at the start of a block."""
        length = int.from_bytes(bytes(block[:HEADER].tolist()), "little")
        if length > self.skeleton_capacity:
            raise PhalanxError("a snapshot block's header is corrupt (skeleton length beyond its capacity)")
        return bytes(block[HEADER: HEADER + length].numpy())

    def unpack(self, block: torch.Tensor, template: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """The nested state from a block; tensors are copies. `template` (a freshly built trainer's
        state) supplies the objects JSON could not hold and the DTensor placement of sharded leaves."""
        skeleton = json.loads(self.skeleton_json(block).decode())
        template_flat = flatten_state_dict(template)[0] if template is not None else {}
        flat: dict[str, Any] = {}
        for fqn, encoded in skeleton["values"].items():
            flat[fqn] = _decode(encoded, template_flat.get(fqn))
        for leaf, view in zip(self.leaves, self.views(block)):
            flat[leaf.fqn] = _as_template(view.clone(), template_flat.get(leaf.fqn))
        mapping = {fqn: tuple(path) for fqn, path in skeleton["mapping"].items()}
        return unflatten_state_dict(flat, mapping)


def _as_template(local: torch.Tensor, template: Any) -> torch.Tensor:
    """Place a restored local chunk like the template's leaf (same DTensor mesh and placements)."""
    if isinstance(template, DTensor):
        return DTensor.from_local(local.to(template.device), template.device_mesh, template.placements,
                                  shape=template.shape, stride=template.stride(), run_check=False)
    if isinstance(template, torch.Tensor):
        return local.to(template.device)
    return local


def _mapping(state: dict[str, Any]) -> dict[str, Any]:
    return flatten_state_dict(state)[1]


def _skeleton_json(state: dict[str, Any], flat: dict[str, Any], mapping: dict[str, Any]) -> bytes:
    values = {fqn: _encode(v) for fqn, v in flat.items() if not isinstance(v, torch.Tensor)}
    return json.dumps({"values": values, "mapping": {fqn: list(path) for fqn, path in mapping.items()}},
                      separators=(",", ":")).encode()


def read_skeleton_values(data: bytes, template: Optional[dict[str, Any]] = None
                         ) -> tuple[dict[str, Any], dict[str, tuple]]:
    """(non-tensor leaves, fqn -> path mapping) from skeleton JSON bytes."""
    skeleton = json.loads(data)
    template_flat = flatten_state_dict(template)[0] if template else {}
    values = {fqn: _decode(v, template_flat.get(fqn)) for fqn, v in skeleton["values"].items()}
    return values, {fqn: tuple(path) for fqn, path in skeleton["mapping"].items()}


def encode_values(flat: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of a flat state's non-tensor leaves."""
    return {fqn: _encode(v) for fqn, v in flat.items() if not isinstance(v, torch.Tensor)}


def mapping_json(state: dict[str, Any]) -> bytes:
    return json.dumps({fqn: list(path) for fqn, path in flatten_state_dict(state)[1].items()},
                      separators=(",", ":")).encode()
