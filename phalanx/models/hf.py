"""Hugging Face Llama weights <-> phalanx's GPT: names, the RoPE row order of q and k, and sliced reads.

phalanx's GPT is a Llama: the same blocks, norms and SwiGLU. Two things differ. The names (`tok_embeddings` for
`model.embed_tokens`, ...: `hf_name`), and the rows of wq and wk: transformers rotates the two halves of each
head (dims i and i + hd/2 form a RoPE pair), phalanx rotates interleaved pairs (2i, 2i + 1), so each head's rows
are reordered on the way in (`to_interleaved`) and back on the way out (`to_halves`).

`HFWeights.fill` loads a layout's parameters from `*.safetensors`: each rank reads only the rows and columns its
shard holds (a DTensor's local region; a pipeline stage's own blocks), straight from the memory-mapped files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any, Optional

import torch

from phalanx.errors import ConfigError, PhalanxError

INDEX = "model.safetensors.index.json"
_RULES = [  # (phalanx name, Hugging Face name), as regular expressions over the whole name
    (r"tok_embeddings\.weight", r"model.embed_tokens.weight"),
    (r"norm\.weight", r"model.norm.weight"),
    (r"output\.weight", r"lm_head.weight"),
    (r"layers\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.attn\.w([qkvo])\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"layers\.(\d+)\.mlp\.w1\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.mlp\.w3\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.mlp\.w2\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"layers\.(\d+)\.mlp\.router\.weight", r"model.layers.\1.block_sparse_moe.gate.weight"),  # Mixtral
]
# Mixtral keeps one (F, d) or (d, F) matrix per expert; phalanx stacks them transposed: (E, d, F) and (E, F, d)
_EXPERTS = r"layers\.(\d+)\.mlp\.experts\.(w[123])"


def expert_names(name: str, experts: range) -> Optional[list[str]]:
    """The Mixtral names of each expert's matrix in phalanx's stacked `name`, or None if it is not one."""
    match = re.fullmatch(_EXPERTS, name)
    if match is None:
        return None
    layer, which = match.groups()
    return [f"model.layers.{layer}.block_sparse_moe.experts.{e}.{which}.weight" for e in experts]


def hf_name(name: str) -> str:
    """The Hugging Face name of phalanx parameter `name`; MoE parameters have none (dense Llama only)."""
    for ours, theirs in _RULES:
        if re.fullmatch(ours, name):
            return re.sub(ours, theirs, name)
    raise PhalanxError(f"parameter '{name}' has no Hugging Face Llama or Mixtral name (a shared expert has "
                       f"none): export --format safetensors instead")


def rope_heads(name: str, cfg: Any) -> int:
    """How many heads' rows `name` holds in RoPE order (wq: n_heads, wk: n_kv_heads), else 0."""
    if name.endswith("attn.wq.weight"):
        return cfg.n_heads
    if name.endswith("attn.wk.weight"):
        return cfg.n_kv_heads or cfg.n_heads
    return 0


def to_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of `heads` heads from half-split RoPE pairs (i, i + hd/2) to interleaved ones (2i, 2i + 1)."""
    hd = weight.shape[0] // heads
    return weight.reshape(heads, 2, hd // 2, -1).transpose(1, 2).reshape(weight.shape)


def to_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `to_interleaved`."""
    hd = weight.shape[0] // heads
    return weight.reshape(heads, hd // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


def export_state(weights: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """Whole phalanx weights (unparallelised names) as a LlamaForCausalLM state dict."""
    out = {}
    for name, tensor in weights.items():
        if cfg.tie_embeddings and name == "output.weight":
            continue  # tied: transformers ties lm_head to embed_tokens itself
        per_expert = expert_names(name, range(tensor.shape[0]))
        if per_expert is not None:
            out.update({theirs: tensor[e].t().contiguous() for e, theirs in enumerate(per_expert)})
            continue
        heads = rope_heads(name, cfg)
        out[hf_name(name)] = (to_halves(tensor, heads) if heads else tensor).contiguous()
    return out


def local_region(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, lengths) of the part of the whole tensor that this rank's `param` holds."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return tuple(offset), tuple(shape)
    return (0,) * param.dim(), tuple(param.shape)


class HFWeights:
    """The `*.safetensors` of a Hugging Face model folder, read by name and region."""

    def __init__(self, path: str):
        self.path = path
        self.files = self._weight_map()
        self._opened: dict[str, Any] = {}  # file -> its safe_open handle, while `fill` reads (header parsed once)
        self._closing = contextlib.ExitStack()

    def _weight_map(self) -> dict[str, str]:
        index = os.path.join(self.path, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                return {name: os.path.join(self.path, file) for name, file in json.load(f)["weight_map"].items()}
        from safetensors import safe_open

        files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors"))
        if not files:
            raise ConfigError(f"model.init_from: no *.safetensors in '{self.path}'; save the model with "
                              f"save_pretrained(..., safe_serialization=True) (pickled .bin weights are not read)")
        names = {}
        for file in files:
            with safe_open(os.path.join(self.path, file), framework="pt") as f:
                names.update({name: os.path.join(self.path, file) for name in f.keys()})
        return names

    def read(self, name: str, shape: tuple[int, ...], heads: int, offsets: tuple[int, ...],
             lengths: tuple[int, ...]) -> torch.Tensor:
        """The region (offsets, lengths) of phalanx parameter `name` (whole shape `shape`), from its HF tensor."""
        per_expert = expert_names(name, range(offsets[0], offsets[0] + lengths[0]))
        if per_expert is not None:  # this rank's experts, each read transposed (expert parallelism: its own)
            return torch.stack([self._read(theirs, (shape[2], shape[1]), (offsets[2], offsets[1]),
                                           (lengths[2], lengths[1])).t() for theirs in per_expert])
        return self._read(hf_name(name), shape, offsets, lengths, heads, name)

    def _read(self, theirs: str, shape: tuple[int, ...], offsets: tuple[int, ...], lengths: tuple[int, ...],
              heads: int = 0, name: str = "") -> torch.Tensor:
        from safetensors import safe_open

        name = name or theirs
        if theirs not in self.files:
            raise ConfigError(f"model.init_from: '{self.path}' has no tensor '{theirs}' (for {name}); "
                              f"is it a complete Llama checkpoint?")
        file = self.files[theirs]
        if file not in self._opened:
            self._opened[file] = self._closing.enter_context(safe_open(file, framework="pt"))
        stored = self._opened[file].get_slice(theirs)
        if tuple(stored.get_shape()) != tuple(shape):
            raise ConfigError(f"model.init_from: '{theirs}' in '{self.path}' has shape {stored.get_shape()}, "
                              f"phalanx's {name} {list(shape)}; the config.json and weights disagree")
        if not heads:
            return stored[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
        # whole heads around the rows wanted: the RoPE reorder moves rows only within a head
        hd = shape[0] // heads
        first, last = offsets[0] // hd, -(-(offsets[0] + lengths[0]) // hd)
        rows = stored[(slice(first * hd, last * hd), *(slice(o, o + n) for o, n in zip(offsets[1:], lengths[1:])))]
        start = offsets[0] - first * hd
        return to_interleaved(rows, last - first)[start:start + lengths[0]]

    @torch.no_grad()
    def fill(self, params: dict[str, torch.Tensor], cfg: Any) -> None:
        """Copy each parameter's region from the files (every rank its own shard; nothing is communicated)."""
        from torch.distributed.tensor import DTensor

        try:
            for name, param in params.items():
                offsets, lengths = local_region(param)
                piece = self.read(name, tuple(param.shape), rope_heads(name, cfg), offsets, lengths)
                local = param.to_local() if isinstance(param, DTensor) else param
                local.copy_(piece.to(local.dtype))
        finally:
            self._closing.close()  # the files' handles (and their maps) go once every parameter is filled
            self._opened.clear()
