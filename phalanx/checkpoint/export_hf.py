"""`phalanx ckpt export RUN --format hf`: a checkpoint as a Hugging Face Llama (or Mixtral) folder.

config.json (phalanx's model section as a LlamaConfig or MixtralConfig), the weights under transformers' names
with q and k rows back in its RoPE order, sharded `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json`, and the tokenizer files when the run's data was prepared with one
(`phalanx data prepare --tokenizer`). The folder is written beside its final name and renamed into place: a
reader never sees half of it, and an existing folder is replaced only with --force.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from phalanx import hfconfig
from phalanx.config import ModelConfig
from phalanx.data.index import INDEX as DATA_INDEX
from phalanx.data.tokenizer import TOKENIZER_FILES
from phalanx.errors import PhalanxError
from phalanx.models.hf import INDEX, export_state
from phalanx.models.mlp import ffn_dim

MAX_SHARD_BYTES = 5 << 30  # transformers' own default shard size (save_pretrained max_shard_size="5GB")


def model_config(run_cfg: dict[str, Any]) -> ModelConfig:
    """The run's model section as saved (not re-filled from model.init_from, whose folder may be gone)."""
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), run_cfg.get("model") or {})
    return OmegaConf.to_object(merged)


def tokenizer_source(run_cfg: dict[str, Any]) -> tuple[Optional[str], dict[str, Any]]:
    """(folder holding the run's tokenizer files, its data index) when its data was prepared with a tokenizer."""
    data = run_cfg.get("data") or {}
    path = data.get("path")
    if data.get("kind") != "memmap" or not path:
        return None, {}
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    index: dict[str, Any] = {}
    if os.path.isfile(os.path.join(folder, DATA_INDEX)):
        with open(os.path.join(folder, DATA_INDEX)) as f:
            index = json.load(f)
    has_files = any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)
    return (folder if has_files else None), index


def shards(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in order, cut into groups of at most `limit` bytes (a larger tensor is a group alone)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append({})
            size = 0
        groups[-1][name] = tensor
        size += nbytes
    return groups


def write_hf(weights: dict[str, torch.Tensor], run_cfg: dict[str, Any], out: str, step: int, force: bool,
             max_shard_bytes: int = MAX_SHARD_BYTES) -> tuple[str, int, int]:
    """Write `weights` (whole, phalanx names) as a Hugging Face Llama folder `out`; (folder, tensors, bytes)."""
    from safetensors.torch import save_file

    cfg = model_config(run_cfg)
    if os.path.exists(out) and not force:
        raise PhalanxError(f"{out} exists; pass --force to replace it, or --out another folder")
    folder, index = tokenizer_source(run_cfg)
    dtype = str(next(iter(weights.values())).dtype).removeprefix("torch.")
    config = hfconfig.hf_config(cfg, ffn_dim(cfg), eos_id=index.get("eos_id"), bos_id=index.get("bos_id"),
                                dtype=dtype)  # refuses an MoE that no Hugging Face model computes
    state = export_state(weights, cfg)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    groups = shards(state, max_shard_bytes)
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, os.path.join(tmp, name), metadata={"format": "pt", "phalanx_step": str(step)})
        weight_map.update({tensor: name for tensor in group})
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(os.path.join(tmp, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(os.path.join(tmp, "config.json"), config)
    for file in TOKENIZER_FILES if folder else ():
        if os.path.isfile(os.path.join(folder, file)):
            shutil.copyfile(os.path.join(folder, file), os.path.join(tmp, file))
    if os.path.exists(out):  # --force: the old folder goes only once the new one is complete
        old = f"{out}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out, len(state), total


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
