"""The persistent tier: committed snapshots written by keepers to any fsspec URL, in DCP format.

`checkpoints/step-N/` holds what `torch.distributed.checkpoint.save` would have written — one
`__R_0.distcp` per writing rank and a `.metadata` — so plain DCP loads it and reshards it to another
world size or layout, plus `rank-R.safetensors` for state that is each rank's own (its RNG streams)
with its non-tensor values as JSON in the file's metadata.
Each keeper writes its ranks' files from snapshot memory and a `.results/rank-R.json` last; the
keeper of rank 0 then writes `.metadata` and, last of all, `manifest.json` with every file's size
and BLAKE2b digest — signed, when the run has a key (`signing.py`). A folder without a manifest is a
torn write and is never loaded; a file whose digest differs, or a manifest whose signature does not
verify, is named and its checkpoint skipped. Nothing read back can run code or allocate beyond the
files (`untrusted.py`): the DCP metadata is parsed by an exact allow-list and checked against the
manifest, DCP items are bounded and load with `weights_only=True`, rank-local files are safetensors
and JSON.
Writing, listing and retention never import torch (a keeper runs them): the bytes torch and DCP would
write come from `torchfmt.py`; reading a checkpoint back goes through DCP (`vetted.py`) and imports it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import fsspec

from phalanx.checkpoint.leaves import LeafMeta, leaf_bytes, skeleton_bytes
from phalanx.checkpoint.signing import mac, sign, signature_problem
from phalanx.checkpoint.torchfmt import Buffer, decode, metadata_pickle, safetensors_bytes, tensor_item, value_item
from phalanx.checkpoint.untrusted import (FORMAT, MANIFEST, MAX_HEADER_BYTES, MAX_MANIFEST_BYTES, MAX_METADATA_BYTES,
                                          CheckpointRefused, parse_manifest, safetensors_skeleton)
from phalanx.errors import ConfigError, PhalanxError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

    from phalanx.checkpoint.flat import FlatLayout

STEP_DIR = re.compile(r"^step-(\d+)$")


def _digest() -> Any:
    return hashlib.blake2b(digest_size=16)


# ---- what each rank writes (agreed once per run, by every rank) ---------------------------


def persist_plan(state: dict[str, Any], layout: FlatLayout, rank_local_keys: tuple[str, ...], rank: int,
                 all_gather: Callable[[Any], list[Any]]) -> dict[str, Any]:
    """This rank's share of a persisted checkpoint: the DCP items it writes (each chunk held by several
    ranks is written once, by the least-loaded holder, as DCP's dedup does) and its rank-local leaves."""
    import torch  # the trainer plans (it holds torch already); a keeper only follows the plan

    from phalanx.checkpoint.flat import flatten_state_dict

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


class CheckpointStore:
    """The persistent checkpoints of one run at an fsspec URL (a local path works too). With a signing
    `key`, what it finalizes is signed and what it verifies must carry this key's signature."""

    def __init__(self, url: str, key: Optional[bytes] = None, run_hint: str = "RUN"):
        self.url, self.key, self.run_hint = url, key, run_hint
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as err:  # an unknown protocol, or its driver not installed
            raise ConfigError(f"checkpoint.storage={url!r}: {str(err).splitlines()[0]}; install the fsspec driver "
                               f"of that protocol (s3:// needs s3fs, gs:// gcsfs, az:// adlfs) or use a local "
                               f"folder") from None

    def path(self, step: int) -> str:
        """Step `step`'s folder, without the protocol (what `self.fs` takes)."""
        return f"{self.root.rstrip('/')}/step-{step}"

    def step_url(self, step: int) -> str:
        """Step `step`'s folder with the protocol (what a reader that opens its own filesystem takes)."""
        return self.fs.unstrip_protocol(self.path(step))

    def _file(self, step: int, name: str) -> str:
        return f"{self.path(step)}/{name}"

    def _forget_listings(self) -> None:
        """Drop the folder listings fsspec cached (s3fs, gcsfs): other processes — every node's keepers — add and
        delete this store's files, and a stale listing hides a newer step, or says a file in it does not exist."""
        self.fs.invalidate_cache()

    def _read(self, path: str, limit: int) -> bytes:
        """A whole file, refused when it holds more than `limit` bytes (read no further than that)."""
        with self.fs.open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise CheckpointRefused(f"{path}: larger than the {limit} bytes its manifest allows: refused")
        return data

    # ---- listing and verifying --------------------------------------------------------------

    def step_dirs(self) -> list[int]:
        """Every step folder, complete or not, oldest first."""
        self._forget_listings()
        if not self.fs.exists(self.root):
            return []
        steps = []
        for entry in self.fs.ls(self.root, detail=False):
            match = STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if match:
                steps.append(int(match.group(1)))
        return sorted(steps)

    def read_manifest(self, step: int) -> dict[str, Any]:
        """The parsed manifest of `step`; FileNotFoundError when there is none, CheckpointRefused when it
        is not a phalanx manifest."""
        path = self._file(step, MANIFEST)
        manifest = parse_manifest(self._read(path, MAX_MANIFEST_BYTES), path)
        if manifest["step"] != step:
            raise CheckpointRefused(f"{path}: names step {manifest['step']}, not {step}: refused")
        return manifest

    def manifest(self, step: int) -> Optional[dict[str, Any]]:
        """The manifest of a committed checkpoint; None for a torn (or unreadable) one."""
        try:
            return self.read_manifest(step)
        except (FileNotFoundError, CheckpointRefused):
            return None

    def committed_steps(self) -> list[int]:
        return [s for s in self.step_dirs() if self.manifest(s) is not None]

    def latest(self) -> Optional[int]:
        steps = self.committed_steps()
        return steps[-1] if steps else None

    def verify(self, step: int, signed: bool = True) -> list[str]:
        """Problems of checkpoint `step` (empty: it may be loaded). Checked: the manifest's form, its signature
        (with a key, unless `signed=False`), every file's size and digest, the DCP metadata against the
        manifest, the rank files' headers."""
        try:
            manifest = self.read_manifest(step)
        except FileNotFoundError:
            return [f"step-{step} has no readable {MANIFEST} (an interrupted write): incomplete"]
        except CheckpointRefused as err:
            return [str(err)]
        if signed and self.key is not None:
            problem = signature_problem(manifest, self.key, self.run_hint)
            if problem is not None:
                return [f"{self._file(step, MANIFEST)}: {problem}"]
        problems = []
        for name, expected in manifest["files"].items():
            path = self._file(step, name)
            try:
                digest, size = _digest(), 0
                with self.fs.open(path, "rb") as f:
                    while size <= expected["bytes"] and (chunk := f.read(1 << 24)):
                        digest.update(chunk)
                        size += len(chunk)
            except FileNotFoundError:
                problems.append(f"{path} is missing")
                continue
            if size != expected["bytes"] or digest.hexdigest() != expected["blake2b"]:
                problems.append(f"{path} does not match its checksum in {MANIFEST} (corrupted)")
        if problems:
            return problems
        try:
            self.read_metadata(step, manifest)
            for name, expected in manifest["files"].items():
                if name.endswith(".safetensors"):
                    path = self._file(step, name)
                    with self.fs.open(path, "rb") as f:
                        head = f.read(8)
                        head += f.read(min(int.from_bytes(head, "little"), MAX_HEADER_BYTES) if len(head) == 8 else 0)
                    safetensors_skeleton(head, expected["bytes"], path)
        except CheckpointRefused as err:
            return [str(err)]
        return []

    def read_metadata(self, step: int, manifest: Optional[dict[str, Any]] = None) -> Metadata:
        """The DCP metadata of `step`, parsed without running code and checked against its manifest."""
        from phalanx.checkpoint.untrusted_metadata import read_metadata

        manifest = manifest or self.read_manifest(step)
        path = self._file(step, ".metadata")
        files = {name: entry["bytes"] for name, entry in manifest["files"].items()}
        return read_metadata(self._read(path, min(files[".metadata"], MAX_METADATA_BYTES)), files, path)

    def newest_valid(self, on_skip: Callable[[int, str], None], below: Optional[int] = None) -> Optional[int]:
        """The newest checkpoint (older than `below`) that verifies; every newer one is reported through `on_skip`."""
        for step in reversed(self.step_dirs()):
            if below is not None and step >= below:
                continue
            problems = self.verify(step)
            if not problems:
                return step
            on_skip(step, "; ".join(problems))
        return None

    def adopt(self, step: int) -> None:
        """Sign checkpoint `step` with this store's key after everything but its signature verified: the
        user vouches for where it came from (`phalanx ckpt verify --trust`)."""
        if self.key is None:
            raise PhalanxError("adopting a checkpoint needs this run's key (the run folder's .keeper-secret, "
                               "checkpoint.key_file or PHALANX_RUN_SECRET)")
        problems = self.verify(step, signed=False)
        if problems:
            raise PhalanxError(f"step-{step} cannot be adopted: {problems[0]}")
        manifest = self.read_manifest(step)
        previous = (manifest.get("signature") or {}).get("key_id")
        manifest = {k: v for k, v in manifest.items() if k != "signature"}
        manifest["adopted"] = {"time": time.time(), "previous_key_id": previous}
        self._write_manifest(step, sign(manifest, self.key))

    def _write_manifest(self, step: int, manifest: dict[str, Any]) -> None:
        self.fs.pipe_file(self._file(step, MANIFEST + ".tmp"), json.dumps(manifest, indent=1).encode())
        self.fs.mv(self._file(step, MANIFEST + ".tmp"), self._file(step, MANIFEST))

    # ---- writing (in a keeper) --------------------------------------------------------------

    def write_rank(self, step: int, rank: int, block: memoryview, plan: dict[str, Any]) -> None:
        """This rank's DCP items and rank-local file from a snapshot block, then its results record."""
        if self.manifest(step) is not None:
            return  # already persisted (a relaunch reached the same step): never rewritten
        layout = plan["layout"]
        leaves = [LeafMeta(**leaf) for leaf in layout["leaves"]]
        raw = json.loads(skeleton_bytes(block, layout["skeleton_capacity"]))
        # Only the shared values this rank writes are decoded; rank-local ones travel as their JSON, and
        # an object JSON cannot hold (a loss scaler) comes from the loading trainer, so it is not written.
        values = {fqn: decode(raw["values"][fqn]) for fqn in plan["write_values"]
                  if not (isinstance(raw["values"][fqn], dict) and "__template__" in raw["values"][fqn])}
        self.fs.makedirs(self.path(step), exist_ok=True)
        items, files = [], {}
        name = f"__{rank}_0.distcp"
        digest, position = _digest(), 0
        with self.fs.open(self._file(step, name), "wb") as f:
            def put(pieces: list[Buffer]) -> tuple[int, int]:
                nonlocal position
                start = position
                for piece in pieces:
                    f.write(piece)
                    digest.update(piece)
                    position += len(piece)
                return start, position - start

            for i in plan["write_tensors"]:
                leaf = leaves[i]
                offset, size = put(tensor_item(leaf.dtype, leaf.shape, leaf_bytes(block, layout, i)))
                items.append({"fqn": leaf.fqn, "path": raw["mapping"][leaf.fqn], "kind": "tensor",
                              "dtype": leaf.dtype, "size": leaf.global_shape,
                              "offsets": leaf.global_offset, "lengths": leaf.shape, "file": name,
                              "offset": offset, "length": size})
            for fqn in [f for f in plan["write_values"] if f in values]:
                offset, size = put(value_item(values[fqn]))
                items.append({"fqn": fqn, "path": raw["mapping"][fqn], "kind": "bytes", "file": name,
                              "offset": offset, "length": size})
        files[name] = {"bytes": position, "blake2b": digest.hexdigest()}
        if plan["local_fqns"]:
            local = set(plan["local_fqns"])
            skeleton = {"values": {k: v for k, v in raw["values"].items() if k in local},
                        "mapping": {k: v for k, v in raw["mapping"].items() if k in local}}
            tensors = {leaves[i].fqn: (leaves[i].dtype, leaves[i].shape, leaf_bytes(block, layout, i))
                       for i in plan["local_tensors"]}
            payload = b"".join(safetensors_bytes(tensors, {"skeleton": json.dumps(skeleton), "format": FORMAT}))
            name = f"rank-{rank}.safetensors"
            self.fs.pipe_file(self._file(step, name), payload)
            digest = _digest()
            digest.update(payload)
            files[name] = {"bytes": len(payload), "blake2b": digest.hexdigest()}
        record: dict[str, Any] = {"step": step, "rank": rank, "items": items, "files": files}
        if self.key is not None:  # the coordinator signs what the records say: they must be its keepers'
            record["mac"] = mac(self.key, record, without="mac")
        self.fs.makedirs(self._file(step, ".results"), exist_ok=True)
        self.fs.pipe_file(self._file(step, f".results/rank-{rank}.json"), json.dumps(record).encode())

    def finalize(self, step: int, world_size: int, timeout_s: float, keep_last: int, info: dict[str, Any],
                 in_flight: Callable[[], set[int]] = set) -> str:
        """Once every rank's results are in: `.metadata`, then the manifest (the commit), then retention."""
        if self.manifest(step) is not None:
            return self.path(step)
        deadline = time.monotonic() + timeout_s
        names = [self._file(step, f".results/rank-{r}.json") for r in range(world_size)]
        records: list[Optional[dict[str, Any]]] = [None] * world_size
        while not all(records):
            for r, name in enumerate(names):
                records[r] = records[r] or self._result(name, step, r)
            if all(records):
                break
            if time.monotonic() > deadline:
                missing = [r for r, record in enumerate(records) if record is None]
                raise PhalanxError(f"step-{step}: ranks {missing} did not persist within {timeout_s:.0f}s (or their "
                                   f"results records were not this run's); the checkpoint stays incomplete and is "
                                   f"never loaded")
            time.sleep(0.05)
        files: dict[str, Any] = {}
        for record in records:
            files.update(record["files"])
        metadata = metadata_pickle(records)
        self.fs.pipe_file(self._file(step, ".metadata"), metadata)
        digest = _digest()
        digest.update(metadata)
        files[".metadata"] = {"bytes": len(metadata), "blake2b": digest.hexdigest()}
        self._forget_listings()  # the other keepers wrote their files since
        for entry in self.fs.ls(self.path(step), detail=False):  # a torn earlier attempt's strays
            base = entry.rstrip("/").rsplit("/", 1)[-1]
            if base not in files and base != ".results":
                self.fs.rm(entry, recursive=True)
        manifest = {**info, "format": FORMAT, "step": step, "world_size": world_size, "time": time.time(),
                    "files": files}
        self._write_manifest(step, sign(manifest, self.key) if self.key is not None else manifest)
        self.fs.rm(self._file(step, ".results"), recursive=True)
        self.apply_retention(keep_last, in_flight(), newest=step)
        return self.path(step)

    def _result(self, path: str, step: int, rank: int) -> Optional[dict[str, Any]]:
        """A rank's results record once it is there and, with a key, MAC'd by one of this run's keepers."""
        try:
            record = json.loads(self._read(path, MAX_MANIFEST_BYTES))
        except (FileNotFoundError, ValueError, CheckpointRefused):
            return None
        if not isinstance(record, dict) or record.get("step", step) != step or record.get("rank") != rank:
            return None
        expected = mac(self.key, record, without="mac") if self.key is not None else None
        if expected is not None and not hmac.compare_digest(str(record.get("mac")), expected):
            return None  # planted, or left by a run with another key: the real one overwrites it
        return record

    def apply_retention(self, keep_last: int, in_flight: set[int] = frozenset(), newest: Optional[int] = None) -> None:
        """Keep the newest `keep_last` complete checkpoints up to `newest` (folders of later steps are not
        this write's to judge); drop torn folders older than the newest complete one, except those still
        being written (`in_flight`)."""
        if keep_last <= 0:
            return
        complete = [s for s in self.committed_steps() if newest is None or s <= newest]
        for old in complete[:-keep_last]:
            self.fs.rm(self.path(old), recursive=True)
        if complete:  # torn folders older than the newest complete one are dead
            for step in self.step_dirs():
                if step < complete[-1] and step not in complete and step not in in_flight:
                    self.fs.rm(self.path(step), recursive=True)

    # ---- loading (in the trainer) -------------------------------------------------------------

    def load(self, step: int, template: dict[str, Any], rank: int, world_size: int,
             rank_local_keys: tuple[str, ...]) -> dict[str, Any]:
        """Fill `template` (a freshly built trainer's state) from checkpoint `step`. Collective when
        distributed. CheckpointRefused when its bytes are not a loadable phalanx checkpoint."""
        from torch.distributed.checkpoint import state_dict_loader
        from torch.distributed.checkpoint.api import CheckpointException

        from phalanx.checkpoint.vetted import SafeLoadPlanner, VettedReader, first_failure, read_rank_local

        self._forget_listings()
        try:
            manifest = self.read_manifest(step)
            metadata = self.read_metadata(step, manifest)
        except FileNotFoundError as err:  # removed since it verified (retention of another writer, a user)
            raise CheckpointRefused(f"{self.path(step)}: {err.filename or 'a file'} is gone: refused") from None
        shared = {k: v for k, v in template.items() if k not in rank_local_keys}
        if "optim" in shared and not any(fqn.startswith("optim.") for fqn in metadata.state_dict_metadata):
            raise PhalanxError(f"checkpoint {self.path(step)} keeps its optimizer state per rank (ZeRO or pipeline "
                               f"partitions, written by phalanx before 2026-12-02): load it with that phalanx at "
                               f"its layout ({manifest['world_size']} ranks), or start a new run beside it with "
                               f"run.resume=false")
        try:
            state_dict_loader.load(shared, storage_reader=VettedReader(self.step_url(step), metadata),
                                   planner=SafeLoadPlanner())
        except CheckpointException as err:
            raise CheckpointRefused(f"{self.path(step)}: DCP could not load it: {first_failure(err)}") from None
        state = {**template, **shared}
        name = f"rank-{rank}.safetensors"
        if manifest["world_size"] == world_size and name in manifest["files"]:
            local_template = {k: template[k] for k in rank_local_keys if k in template}
            path = self._file(step, name)
            state.update(read_rank_local(self._read(path, manifest["files"][name]["bytes"]), local_template, path))
        else:  # another world size: the per-rank state (RNG streams) stays as this launch seeded it
            for key in rank_local_keys:
                state.pop(key, None)
        return state

