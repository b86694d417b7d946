"""The persistent tier: committed snapshots written by keepers to any fsspec URL, in DCP format.

`checkpoints/step-N/` holds what `torch.distributed.checkpoint.save` would have written — one
`__R_0.distcp` per writing rank and a `.metadata` — so plain DCP loads it and reshards it to another
world size or layout, plus `rank-R.safetensors` for state that is each rank's own (RNG streams,
ZeRO / pipeline optimizer partitions) with its non-tensor values as JSON in the file's metadata.
Each keeper writes its ranks' files from snapshot memory and a `.results/rank-R.json` last; the
keeper of rank 0 then writes `.metadata` and, last of all, `manifest.json` with every file's size
and BLAKE2b digest. A folder without a manifest is a torn write and is never loaded; a file whose
digest differs is named and its checkpoint skipped. Loading unpickles nothing from storage: the
DCP metadata goes through an unpickler that admits only DCP's own metadata classes, DCP values load
with `weights_only=True`, rank-local files are safetensors and JSON.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import time
from typing import Any, Callable, Optional

import fsspec
import torch
from torch.distributed.checkpoint import state_dict_loader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)

from phalanx.checkpoint.flat import FlatLayout, _decode, flatten_state_dict, read_skeleton_values, to_dtype
from phalanx.errors import PhalanxError

STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
FORMAT = "phalanx-checkpoint-1"


def _digest() -> Any:
    return hashlib.blake2b(digest_size=16)


# ---- what each rank writes (agreed once per run, by every rank) ---------------------------


def persist_plan(state: dict[str, Any], layout: FlatLayout, rank_local_keys: tuple[str, ...], rank: int,
                 all_gather: Callable[[Any], list[Any]]) -> dict[str, Any]:
    """This rank's share of a persisted checkpoint: the DCP items it writes (each chunk held by several
    ranks is written once, by the least-loaded holder, as DCP's dedup does) and its rank-local leaves."""
    flat, mapping = flatten_state_dict(state)
    local = {fqn for fqn, path in mapping.items() if path[0] in rank_local_keys}
    chunks = [(leaf.fqn, tuple(leaf.global_offset), leaf.nbytes) for leaf in layout.leaves if leaf.fqn not in local]
    values = [fqn for fqn, v in flat.items() if not isinstance(v, torch.Tensor) and fqn not in local]
    everyone = all_gather((chunks, values))
    holders: dict[tuple, list[int]] = {}
    sizes: dict[tuple, int] = {}
    for r, (rank_chunks, rank_values) in enumerate(everyone):
        for fqn, offset, nbytes in rank_chunks:
            holders.setdefault((fqn, offset), []).append(r)
            sizes[(fqn, offset)] = nbytes
        for fqn in rank_values:
            holders.setdefault((fqn, None), []).append(r)
            sizes[(fqn, None)] = 0
    load = [0] * len(everyone)
    writer: dict[tuple, int] = {}
    for key in sorted(holders, key=lambda key: (-sizes[key], key[0], str(key[1]))):
        chosen = min(holders[key], key=lambda r: (load[r], r))
        writer[key] = chosen
        load[chosen] += sizes[key]
    index = {leaf.fqn: i for i, leaf in enumerate(layout.leaves)}
    return {
        "layout": layout.to_json(),
        "write_tensors": [index[fqn] for fqn, offset, _ in chunks if writer[(fqn, offset)] == rank],
        "write_values": [fqn for fqn in values if writer[(fqn, None)] == rank],
        "local_tensors": [i for i, leaf in enumerate(layout.leaves) if leaf.fqn in local],
        "local_fqns": sorted(local),
    }


# ---- loading safely -----------------------------------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle; admit only the classes a DCP metadata object is made of."""

    ALLOWED_MODULES = ("torch.distributed.checkpoint.",)

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(self.ALLOWED_MODULES) or (module, name) in {("collections", "OrderedDict"),
                                                                          ("builtins", "set"), ("torch", "Size"),
                                                                          ("torch.serialization", "_get_layout")}:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata names {module}.{name}, which is not DCP metadata: "
                                     f"refused (phalanx never unpickles arbitrary objects from storage)")


class SafeReader(FsspecReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with self.fs.create_stream(self.fs.concat_path(self.path, ".metadata"), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._nested_dict import set_element

        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                    torch.load(value, weights_only=True))


class CheckpointStore:
    """The persistent checkpoints of one run at an fsspec URL (a local path works too)."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)

    def path(self, step: int) -> str:
        return f"{self.root.rstrip('/')}/step-{step}"

    def _file(self, step: int, name: str) -> str:
        return f"{self.path(step)}/{name}"

    # ---- listing and verifying --------------------------------------------------------------

    def step_dirs(self) -> list[int]:
        """Every step folder, complete or not, oldest first."""
        if not self.fs.exists(self.root):
            return []
        steps = []
        for entry in self.fs.ls(self.root, detail=False):
            match = STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if match:
                steps.append(int(match.group(1)))
        return sorted(steps)

    def manifest(self, step: int) -> Optional[dict[str, Any]]:
        try:
            return json.loads(self.fs.cat_file(self._file(step, MANIFEST)))
        except (FileNotFoundError, ValueError):
            return None

    def committed_steps(self) -> list[int]:
        return [s for s in self.step_dirs() if self.manifest(s) is not None]

    def latest(self) -> Optional[int]:
        steps = self.committed_steps()
        return steps[-1] if steps else None

    def verify(self, step: int) -> list[str]:
        """Problems of checkpoint `step` (empty: every file present with its recorded size and digest)."""
        manifest = self.manifest(step)
        if manifest is None:
            return [f"step-{step} has no readable {MANIFEST} (an interrupted write): incomplete"]
        problems = []
        for name, expected in manifest["files"].items():
            path = self._file(step, name)
            try:
                digest, size = _digest(), 0
                with self.fs.open(path, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                        size += len(chunk)
            except FileNotFoundError:
                problems.append(f"{path} is missing")
                continue
            if size != expected["bytes"] or digest.hexdigest() != expected["blake2b"]:
                problems.append(f"{path} does not match its checksum in {MANIFEST} (corrupted)")
        return problems

    def newest_valid(self, on_skip: Callable[[int, str], None]) -> Optional[int]:
        """The newest checkpoint that verifies; every newer one is reported through `on_skip`."""
        for step in reversed(self.step_dirs()):
            problems = self.verify(step)
            if not problems:
                return step
            on_skip(step, "; ".join(problems))
        return None

    # ---- writing (in a keeper) --------------------------------------------------------------

    def write_rank(self, step: int, rank: int, block: memoryview, plan: dict[str, Any]) -> None:
        """This rank's DCP items and rank-local file from a snapshot block, then its results record."""
        if self.manifest(step) is not None:
            return  # already persisted (a relaunch reached the same step): never rewritten
        from safetensors.torch import save as save_safetensors

        layout = FlatLayout.from_json(plan["layout"])
        data = torch.frombuffer(block, dtype=torch.uint8)
        views = layout.views(data)
        length = int.from_bytes(bytes(block[:8]), "little")
        raw = json.loads(bytes(block[8: 8 + length]))
        # Only the shared values this rank writes are decoded; rank-local ones travel as their JSON, and
        # an object JSON cannot hold (a loss scaler) comes from the loading trainer, so it is not written.
        values = {fqn: _decode(raw["values"][fqn]) for fqn in plan["write_values"]
                  if not (isinstance(raw["values"][fqn], dict) and "__template__" in raw["values"][fqn])}
        self.fs.makedirs(self.path(step), exist_ok=True)
        items, files = [], {}
        name = f"__{rank}_0.distcp"
        digest, position = _digest(), 0
        with self.fs.open(self._file(step, name), "wb") as f:
            def put(buffer: io.BytesIO) -> tuple[int, int]:
                nonlocal position
                payload = buffer.getbuffer()
                f.write(payload)
                digest.update(payload)
                start, position = position, position + len(payload)
                return start, len(payload)

            for i in plan["write_tensors"]:
                leaf, buffer = layout.leaves[i], io.BytesIO()
                torch.save(views[i].clone(), buffer)
                offset, size = put(buffer)
                items.append({"fqn": leaf.fqn, "path": raw["mapping"][leaf.fqn], "kind": "tensor",
                              "dtype": leaf.dtype, "size": leaf.global_shape,
                              "offsets": leaf.global_offset, "lengths": leaf.shape, "file": name,
                              "offset": offset, "length": size})
            for fqn in [f for f in plan["write_values"] if f in values]:
                buffer = io.BytesIO()
                torch.save(values[fqn], buffer)
                offset, size = put(buffer)
                items.append({"fqn": fqn, "path": raw["mapping"][fqn], "kind": "bytes", "file": name,
                              "offset": offset, "length": size})
        files[name] = {"bytes": position, "blake2b": digest.hexdigest()}
        if plan["local_fqns"]:
            local = set(plan["local_fqns"])
            skeleton = {"values": {k: v for k, v in raw["values"].items() if k in local},
                        "mapping": {k: v for k, v in raw["mapping"].items() if k in local}}
            tensors = {layout.leaves[i].fqn: views[i].clone() for i in plan["local_tensors"]}
            payload = save_safetensors(tensors, metadata={"skeleton": json.dumps(skeleton), "format": FORMAT})
            name = f"rank-{rank}.safetensors"
            self.fs.pipe_file(self._file(step, name), payload)
            digest = _digest()
            digest.update(payload)
            files[name] = {"bytes": len(payload), "blake2b": digest.hexdigest()}
        record = json.dumps({"rank": rank, "items": items, "files": files}).encode()
        self.fs.makedirs(self._file(step, ".results"), exist_ok=True)
        self.fs.pipe_file(self._file(step, f".results/rank-{rank}.json"), record)

    def finalize(self, step: int, world_size: int, timeout_s: float, keep_last: int, info: dict[str, Any],
                 in_flight: Callable[[], set[int]] = set) -> str:
        """Once every rank's results are in: `.metadata`, then the manifest (the commit), then retention."""
        if self.manifest(step) is not None:
            return self.path(step)
        deadline = time.monotonic() + timeout_s
        names = [self._file(step, f".results/rank-{r}.json") for r in range(world_size)]
        while not all(self.fs.exists(n) for n in names):
            if time.monotonic() > deadline:
                missing = [r for r, n in enumerate(names) if not self.fs.exists(n)]
                raise PhalanxError(f"step-{step}: ranks {missing} did not persist within {timeout_s:.0f}s; "
                                   f"the checkpoint stays incomplete and is never loaded")
            time.sleep(0.05)
        records = [json.loads(self.fs.cat_file(n)) for n in names]
        state_meta: dict[str, Any] = {}
        storage: dict[MetadataIndex, _StorageInfo] = {}
        files: dict[str, Any] = {}
        paths: dict[str, tuple] = {}  # fqn -> path in the nested state: DCP's planner_data, for unflattening
        for record in records:
            files.update(record["files"])
            for item in record["items"]:
                paths[item["fqn"]] = tuple(item["path"])
                info_ = _StorageInfo(item["file"], item["offset"], item["length"])
                if item["kind"] == "bytes":
                    state_meta[item["fqn"]] = BytesStorageMetadata()
                    storage[MetadataIndex(item["fqn"])] = info_
                    continue
                meta = state_meta.setdefault(item["fqn"], TensorStorageMetadata(
                    TensorProperties(dtype=to_dtype(item["dtype"])), torch.Size(item["size"]), []))
                meta.chunks.append(ChunkStorageMetadata(torch.Size(item["offsets"]), torch.Size(item["lengths"])))
                storage[MetadataIndex(item["fqn"], torch.Size(item["offsets"]))] = info_
        metadata = pickle.dumps(Metadata(state_dict_metadata=state_meta, planner_data=paths, storage_data=storage))
        self.fs.pipe_file(self._file(step, ".metadata"), metadata)
        digest = _digest()
        digest.update(metadata)
        files[".metadata"] = {"bytes": len(metadata), "blake2b": digest.hexdigest()}
        for entry in self.fs.ls(self.path(step), detail=False):  # a torn earlier attempt's strays
            base = entry.rstrip("/").rsplit("/", 1)[-1]
            if base not in files and base != ".results":
                self.fs.rm(entry, recursive=True)
        manifest = {"format": FORMAT, "step": step, "world_size": world_size, "time": time.time(),
                    "files": files, **info}
        self.fs.pipe_file(self._file(step, MANIFEST + ".tmp"), json.dumps(manifest, indent=1).encode())
        self.fs.mv(self._file(step, MANIFEST + ".tmp"), self._file(step, MANIFEST))
        self.fs.rm(self._file(step, ".results"), recursive=True)
        self.apply_retention(keep_last, in_flight())
        return self.path(step)

    def apply_retention(self, keep_last: int, in_flight: set[int] = frozenset()) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop torn folders older than the newest
        complete one, except those still being written (`in_flight`)."""
        if keep_last <= 0:
            return
        complete = self.committed_steps()
        for old in complete[:-keep_last]:
            self.fs.rm(self.path(old), recursive=True)
        if complete:  # torn folders older than the newest complete one are dead
            for step in self.step_dirs():
                if step < complete[-1] and step not in complete and step not in in_flight:
                    self.fs.rm(self.path(step), recursive=True)

    # ---- loading (in the trainer) -------------------------------------------------------------

    def load(self, step: int, template: dict[str, Any], rank: int, world_size: int,
             rank_local_keys: tuple[str, ...]) -> dict[str, Any]:
        """Fill `template` (a freshly built trainer's state) from checkpoint `step`. Collective when distributed."""
        manifest = self.manifest(step)
        shared = {k: v for k, v in template.items() if k not in rank_local_keys}
        state_dict_loader.load(shared, storage_reader=SafeReader(self.path(step)), planner=SafeLoadPlanner())
        state = {**template, **shared}
        name = f"rank-{rank}.safetensors"
        if manifest["world_size"] == world_size and name in manifest["files"]:
            local_template = {k: template[k] for k in rank_local_keys if k in template}
            state.update(read_rank_local(self.fs.cat_file(self._file(step, name)), local_template))
            return state
        for key in rank_local_keys:
            if key != "rng" and key in template:
                raise PhalanxError(f"checkpoint {self.path(step)} was written by {manifest['world_size']} ranks and "
                                   f"its '{key}' state is per rank (ZeRO or pipeline partitions): resume it with "
                                   f"{manifest['world_size']} ranks and the same parallel layout")
            state.pop(key, None)  # another world size: this rank keeps its fresh RNG streams
        return state


def read_rank_local(payload: bytes, template: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A `rank-R.safetensors` file as the nested rank-local state (tensors placed like `template`'s)."""
    from safetensors.torch import load as load_safetensors
    from torch.distributed.checkpoint._nested_dict import unflatten_state_dict

    from phalanx.checkpoint.flat import _as_template

    tensors = load_safetensors(payload)
    header = json.loads(payload[8: 8 + int.from_bytes(payload[:8], "little")])
    values, mapping = read_skeleton_values(header["__metadata__"]["skeleton"].encode(), template)
    template_flat = flatten_state_dict(template)[0] if template else {}
    flat = {**values, **{k: _as_template(v, template_flat.get(k)) for k, v in tensors.items()}}
    return unflatten_state_dict(flat, mapping)
