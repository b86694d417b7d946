"""Loading a persisted checkpoint through DCP with only vetted bytes: the trainer's half of the
persistent tier (`persistent.py` writes without torch; this half needs it)."""

from __future__ import annotations

import io
from typing import Any, Optional

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from phalanx.checkpoint.flat import flatten_state_dict, read_skeleton_values
from phalanx.checkpoint.untrusted import CheckpointRefused, check_torch_item, reading, safetensors_skeleton


class VettedReader(FsspecReader):
    """DCP's fsspec reader over metadata phalanx already parsed and checked (`untrusted_metadata.read_metadata`);
    each item is read within its bounds and its zip records checked before `torch.load` sees it."""

    def __init__(self, path: str, metadata: Metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata

    def _slice_file(self, file: Any, sinfo: _StorageInfo) -> io.BytesIO:
        file.seek(sinfo.offset)
        data = file.read(sinfo.length)
        where = f"{self.path}/{sinfo.relative_path} at byte {sinfo.offset}"
        if len(data) != sinfo.length:
            raise CheckpointRefused(f"{where}: the item is cut short ({len(data)} of {sinfo.length} bytes): refused")
        check_torch_item(data, where)
        return io.BytesIO(data)


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._nested_dict import set_element

        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                    torch.load(value, weights_only=True))


def first_failure(err: CheckpointException) -> str:
    """The first rank's failure of a DCP load, as one line (its own refusal when phalanx raised it)."""
    failures = list(getattr(err, "failures", {}).values())
    cause = failures[0] if failures else err
    cause = getattr(cause, "exc", cause)  # CheckpointException wraps each rank's error with its traceback
    return str(cause).splitlines()[0][:300] if str(cause) else type(cause).__name__


def read_rank_local(payload: bytes, template: Optional[dict[str, Any]] = None,
                    where: str = "rank file") -> dict[str, Any]:
    """A `rank-R.safetensors` file as the nested rank-local state (tensors placed like `template`'s)."""
    from safetensors.torch import load as load_safetensors
    from torch.distributed.checkpoint._nested_dict import unflatten_state_dict

    from phalanx.checkpoint.flat import _as_template

    skeleton = safetensors_skeleton(payload, len(payload), where)
    with reading(where):
        tensors = load_safetensors(payload)
        values, mapping = read_skeleton_values(skeleton, template)
    template_flat = flatten_state_dict(template)[0] if template else {}
    flat = {**values, **{k: _as_template(v, template_flat.get(k)) for k, v in tensors.items()}}
    return unflatten_state_dict(flat, mapping)
