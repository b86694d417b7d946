"""A snapshot block's layout as plain data: what a keeper reads to persist a block without loading torch.

A block is `HEADER` bytes of skeleton-JSON length, the skeleton JSON (in a fixed reserved capacity), then
each tensor leaf at its aligned offset (`flat.FlatLayout` builds the layout from a state and packs it).
"""

from __future__ import annotations

from dataclasses import dataclass

ALIGN = 64  # bytes; every tensor starts on a cache line so typed views of the region are legal
HEADER = 8  # little-endian length of the skeleton JSON at the start of a block


@dataclass(frozen=True)
class LeafMeta:
    """Where one tensor leaf lives in the region, and where its chunk sits in the global tensor."""

    fqn: str
    dtype: str  # e.g. "float32"
    shape: list[int]  # local (this rank's chunk)
    offset: int  # into the tensor region
    nbytes: int
    global_shape: list[int]
    global_offset: list[int]


def leaf_bytes(block: memoryview, layout: dict, index: int) -> memoryview:
    """The bytes of leaf `index` of a block laid out as `layout` (`FlatLayout.to_json`), not copied."""
    leaf = layout["leaves"][index]
    start = HEADER + layout["skeleton_capacity"] + leaf["offset"]
    return block[start: start + leaf["nbytes"]]


def skeleton_bytes(block: memoryview, capacity: int) -> bytes:
    """The skeleton JSON at the start of a block whose reserved capacity is `capacity` bytes."""
    length = int.from_bytes(bytes(block[:HEADER]), "little")
    if length > capacity:
        raise ValueError("a snapshot block's header is corrupt (skeleton length beyond its capacity)")
    return bytes(block[HEADER: HEADER + length])
