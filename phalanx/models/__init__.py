"""Models. `MODEL_KINDS` maps `model.kind` to a constructor taking a ModelConfig."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from phalanx import hfconfig
from phalanx.models.gpt import GPT, flops_per_token
from phalanx.models.hf import HFWeights

MODEL_KINDS: dict[str, Callable[..., nn.Module]] = {"gpt": GPT}


def build_on_meta(cfg) -> nn.Module:
    """The model with no storage: parallel strategies reshape it before any memory is spent."""
    with torch.device("meta"):
        return MODEL_KINDS[cfg.kind](cfg)


def materialize(model: nn.Module, device: torch.device, seed: int, init_from: Optional[str] = None) -> nn.Module:
    """Allocate the (possibly parallelised) model on `device` and initialise it from `seed`, or from the
    Hugging Face model named by `init_from` ("hf:DIR", model.init_from: each rank reads its own shard)."""
    model.to_empty(device=device)
    generator = torch.Generator().manual_seed(seed)
    model.init_weights(generator, HFWeights(hfconfig.folder(init_from)) if init_from else None)
    return model


__all__ = ["GPT", "MODEL_KINDS", "build_on_meta", "materialize", "flops_per_token"]
