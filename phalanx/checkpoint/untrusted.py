"""Readers of the bytes a checkpoint store hands back: nothing in them can run code or make phalanx
allocate more than the files hold, and anything malformed is one `CheckpointRefused` line naming the file.

Storage is shared and long-lived; whoever can write to it can write any bytes. So:
- `manifest.json` is parsed into a fixed schema: only phalanx's own file names (no paths), bounded
  counts and sizes.
- DCP's `.metadata` is a pickle, read by an allow-list unpickler and checked against the manifest
  (`untrusted_metadata.py`, the one reader here that needs torch: a keeper that writes checkpoints
  imports this module and never loads torch).
- Each tensor item of a `*.distcp` is a `torch.save` zip; before `torch.load(weights_only=True)` sees
  it, its records must be stored uncompressed and fit the item.
- `rank-R.safetensors`: the header length and every tensor's offsets must lie inside the file.
"""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
import zipfile
from typing import Any, Iterator

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
