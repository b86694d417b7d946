"""The model's parameter shapes, read from the real model built on the meta device (no memory).

Every byte count the planner predicts derives from these shapes and the config, never from a
measurement: what the strategies would shard, gather, reduce or send.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

Shape = tuple[int, ...]


@dataclass(frozen=True)
class BlockShapes:
    dense: tuple[Shape, ...]  # attention, norms, dense MLP or router (+ shared expert)
    experts: tuple[Shape, ...]  # stacked expert weights (E, ., .), empty for a dense block

    @property
    def is_moe(self) -> bool:
        return bool(self.experts)


@dataclass(frozen=True)
class ModelShapes:
    blocks: tuple[BlockShapes, ...]
    embedding: Shape
    norm: Shape
    head: Shape
    d_model: int

    def numel(self, shapes: tuple[Shape, ...]) -> int:
        return sum(math.prod(s) for s in shapes)

    @property
    def total(self) -> int:
        return sum(self.numel(b.dense + b.experts) for b in self.blocks) + self.numel(
            (self.embedding, self.norm, self.head))


_CACHE: dict[str, ModelShapes] = {}


def model_shapes(model_cfg: Any) -> ModelShapes:
    """Shapes of `model_cfg`'s parameters (cached per model config: the planner asks thousands of times)."""
    key = repr(model_cfg)  # a dataclass: its repr names every field, nested MoE config included
    if key not in _CACHE:
        _CACHE[key] = _build(model_cfg)
    return _CACHE[key]


def _build(model_cfg: Any) -> ModelShapes:
    from phalanx.models import build_on_meta

    model = build_on_meta(model_cfg)
    blocks = []
    for block in model.layers.values():
        dense, experts = [], []
        for name, param in block.named_parameters():
            (experts if ".experts." in f".{name}" else dense).append(tuple(param.shape))
        blocks.append(BlockShapes(tuple(dense), tuple(experts)))
    head = (0,) if model_cfg.tie_embeddings else tuple(model.output.weight.shape)  # tied: counted once
    return ModelShapes(tuple(blocks), tuple(model.tok_embeddings.weight.shape), tuple(model.norm.weight.shape),
                       head, model_cfg.d_model)
