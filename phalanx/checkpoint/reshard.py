"""Resharding from keeper memory: the blocks of a step another layout snapshotted, read into this launch's state.

Every rank's block is a flat layout (`flat.py`): each tensor leaf is a chunk of a global tensor, named and
placed globally (`LeafMeta.global_shape`, `global_offset`). The blocks of all the earlier launch's ranks
together are therefore a DCP checkpoint whose storage is keeper memory: `memory_metadata` writes its
metadata, `BlockReader` serves DCP's reads from the blocks, fetched once each and only if a chunk this rank
needs is in them, and DCP's own load planner works out which slices of which chunks every leaf of this
launch's state needs, for any layout. The non-tensor values (step, data position, LR schedule) come from
the first old rank's skeleton; state that is per rank (its RNG streams) is not carried over.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch.distributed.checkpoint import state_dict_loader
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from phalanx.checkpoint.flat import FlatLayout, read_skeleton_values, to_dtype
from phalanx.errors import PhalanxError

Source = tuple[int, int]  # (old rank, index of the leaf in its layout)


def memory_metadata(layouts: dict[int, FlatLayout], prefer: Callable[[int], bool] = lambda rank: False
                    ) -> tuple[Metadata, dict[MetadataIndex, Source]]:
    """DCP metadata of the old ranks' blocks, and where each chunk is read. A chunk several ranks hold
    (replicated state) is read from one of them: a `prefer`red rank (its block is near), else the lowest."""
    state_meta: dict[str, TensorStorageMetadata] = {}
    sources: dict[MetadataIndex, Source] = {}
    for rank in sorted(layouts, key=lambda r: (not prefer(r), r)):
        for i, leaf in enumerate(layouts[rank].leaves):
            index = MetadataIndex(leaf.fqn, torch.Size(leaf.global_offset))
            if index in sources:
                continue
            meta = state_meta.setdefault(leaf.fqn, TensorStorageMetadata(
                TensorProperties(dtype=to_dtype(leaf.dtype)), torch.Size(leaf.global_shape), []))
            if list(meta.size) != leaf.global_shape or meta.properties.dtype != to_dtype(leaf.dtype):
                raise PhalanxError(f"the keepers' blocks disagree on {leaf.fqn}: {list(meta.size)} vs "
                                   f"{leaf.global_shape}; they cannot be one step's state")
            meta.chunks.append(ChunkStorageMetadata(torch.Size(leaf.global_offset), torch.Size(leaf.shape)))
            sources[index] = (rank, i)
    return Metadata(state_dict_metadata=state_meta), sources


class BlockReader(StorageReader):
    """DCP storage over the old ranks' blocks: `fetch(old rank)` returns a block (a uint8 tensor)."""

    def __init__(self, metadata: Metadata, sources: dict[MetadataIndex, Source], layouts: dict[int, FlatLayout],
                 fetch: Callable[[int], torch.Tensor]):
        super().__init__()
        self.metadata, self.sources, self.layouts, self.fetch = metadata, sources, layouts, fetch
        self.blocks: dict[int, torch.Tensor] = {}  # old rank -> its block, fetched on first use
        self.views: dict[int, list[torch.Tensor]] = {}

    def block(self, rank: int) -> torch.Tensor:
        if rank not in self.blocks:
            self.blocks[rank] = self.fetch(rank)
            self.views[rank] = self.layouts[rank].views(self.blocks[rank])
        return self.blocks[rank]

    def _leaf(self, index: MetadataIndex) -> torch.Tensor:
        rank, i = self.sources[index]
        self.block(rank)
        return self.views[rank][i]

    def reset(self, checkpoint_id: Any = None) -> None:
        return None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        return None

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise PhalanxError(f"{item.dest_index.fqn}: keeper blocks hold tensors only")
            source = _narrow(self._leaf(item.storage_index), item.storage_offsets, item.lengths)
            target = planner.resolve_tensor(item).detach()
            target.copy_(source)
            planner.commit_tensor(item, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


def _narrow(tensor: torch.Tensor, offsets: torch.Size, lengths: torch.Size) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offsets, lengths)):
        if start != 0 or length != tensor.size(dim):
            tensor = tensor.narrow(dim, start, length)
    return tensor


def coverage_problem(template: dict[str, Any], metadata: Metadata, rank_local_keys: tuple[str, ...]) -> Optional[str]:
    """Why the blocks cannot fill `template` (a tensor of it they do not hold whole: its ranks were lost), or
    None. Chunks of one layout are disjoint or equal, so distinct chunks covering a tensor add up to its size."""
    flat, mapping = flatten_state_dict(template)
    for fqn, value in flat.items():
        if not isinstance(value, torch.Tensor) or mapping[fqn][0] in rank_local_keys:
            continue
        meta = metadata.state_dict_metadata.get(fqn)
        if meta is None:
            return f"no keeper holds {fqn}"
        distinct = {(tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks}
        held = sum(math.prod(sizes) for _, sizes in distinct)
        if held < math.prod(meta.size):
            return f"the keepers hold {held} of the {math.prod(meta.size)} elements of {fqn}"
    return None


def reshard(template: dict[str, Any], layouts: dict[int, FlatLayout], fetch: Callable[[int], torch.Tensor],
            rank_local_keys: tuple[str, ...], prefer: Callable[[int], bool] = lambda rank: False
            ) -> tuple[dict[str, Any], list[int]]:
    """`template` (this launch's freshly built state) filled from the old ranks' blocks; (state, the old
    ranks whose blocks were read). Rank-local keys are left out of the state."""
    flat, mapping = flatten_state_dict(template)
    local = {fqn for fqn, path in mapping.items() if path[0] in rank_local_keys}
    tensors = {fqn: v for fqn, v in flat.items() if isinstance(v, torch.Tensor) and fqn not in local}
    metadata, sources = memory_metadata(layouts, prefer)
    reader = BlockReader(metadata, sources, layouts, fetch)
    state_dict_loader.load(tensors, storage_reader=reader, planner=DefaultLoadPlanner(), no_dist=True)
    first = min(layouts, key=lambda r: (r not in reader.blocks, r))  # a block already fetched, if any
    values, _ = read_skeleton_values(layouts[first].skeleton_json(reader.block(first)), template)
    for fqn, value in flat.items():
        if fqn in local or isinstance(value, torch.Tensor):
            continue
        if fqn not in values:
            raise PhalanxError(f"the keepers' state has no {fqn}: it was written by another trainer")
        flat[fqn] = values[fqn]
    state = unflatten_state_dict({k: v for k, v in flat.items() if k not in local},
                                 {k: v for k, v in mapping.items() if k not in local})
    return state, sorted(reader.blocks)
