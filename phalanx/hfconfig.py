"""Hugging Face `config.json` <-> phalanx's `model` section: Llama-family models (Llama 2/3, Mistral-style GQA)
and Mixtral (phalanx's MoE in every block: softmax router, top-k renormalised, dropless).

`model.init_from: hf:DIR` fills the model section from DIR/config.json (`model_fields`); `phalanx ckpt export
--format hf` writes one back (`llama_config`). Only what phalanx's GPT computes is accepted: a config with RoPE
scaling, biases, another activation or a sliding window shorter than the sequence is refused with its key named,
since loading it would give other logits without any error. Plain JSON: no `transformers` needed at run time.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from phalanx.errors import ConfigError

PREFIX = "hf:"
DENSE_TYPES = ("llama", "mistral")
MOE_TYPES = ("mixtral",)
# config.json key -> model section key, for the fields that must agree with any the user set
KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "intermediate_size": "ffn_dim",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
}


def folder(init_from: str) -> str:
    """The local folder named by `model.init_from` ("hf:DIR")."""
    if not init_from.startswith(PREFIX):
        raise ConfigError(f"model.init_from={init_from!r}: give hf:DIR, a local folder with config.json and "
                          f"*.safetensors (a Hugging Face model saved by save_pretrained or downloaded)")
    path = os.path.expanduser(init_from[len(PREFIX):])
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"model.init_from={init_from!r}: no config.json in '{path}'; give the folder that "
                          f"save_pretrained wrote (config.json beside model*.safetensors)")
    return path


def read(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"'{path}/config.json' is not readable JSON ({err}); re-download or re-save the model")
    if not isinstance(hf, dict):
        raise ConfigError(f"'{path}/config.json' holds no mapping; re-download or re-save the model")
    return hf


def rope_theta(hf: dict[str, Any], where: str) -> float:
    """transformers 4 writes rope_theta (and rope_scaling); 5 writes rope_parameters."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConfigError(f"{where}: RoPE type {kind!r} (scaled positions, e.g. Llama 3.1's) is not phalanx's "
                          f"plain RoPE; use a model without rope scaling")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_fields(path: str, seq_len: int) -> dict[str, Any]:
    """The model section's values from `path`/config.json; raises ConfigError on what phalanx cannot compute."""
    hf = read(path)
    where = f"'{path}/config.json'"
    kind = hf.get("model_type")
    if kind not in DENSE_TYPES + MOE_TYPES:
        raise ConfigError(f"{where}: model_type {kind!r} is not one phalanx imports; it reads "
                          f"{', '.join(DENSE_TYPES + MOE_TYPES)} (Llama-family models)")
    for key, allowed in (("hidden_act", ("silu",)), ("attention_bias", (False, None)), ("mlp_bias", (False, None))):
        if hf.get(key) not in allowed:
            raise ConfigError(f"{where}: {key}={hf.get(key)!r}; phalanx's Llama block has {key}={allowed[0]}")
    missing = [key for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if key not in hf]
    if missing:
        raise ConfigError(f"{where} has no {', '.join(missing)}; it is not a complete Llama config")
    fields = {ours: hf[theirs] for theirs, ours in KEYS.items() if theirs in hf}
    fields.setdefault("n_kv_heads", hf["num_attention_heads"])
    fields.setdefault("norm_eps", 1e-6)
    fields.setdefault("tie_embeddings", False)
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        raise ConfigError(f"{where}: head_dim={head_dim} x num_attention_heads={hf['num_attention_heads']} != "
                          f"hidden_size={hf['hidden_size']}; phalanx's heads split d_model evenly")
    window = hf.get("sliding_window")
    if window is not None and window < seq_len:
        raise ConfigError(f"{where}: sliding_window={window} is shorter than data.seq_len={seq_len} and phalanx "
                          f"attends to the whole sequence; set data.seq_len <= {window}")
    fields["rope_theta"] = rope_theta(hf, where)
    fields["max_seq_len"] = int(hf.get("max_position_embeddings") or seq_len)
    if kind in MOE_TYPES:
        if hf.get("router_jitter_noise"):
            raise ConfigError(f"{where}: router_jitter_noise={hf['router_jitter_noise']}; phalanx's router has "
                              f"no jitter: set it to 0 in config.json to train without it")
        fields.update({"moe.num_experts": hf["num_local_experts"], "moe.top_k": hf["num_experts_per_tok"],
                       "moe.ffn_dim": hf["intermediate_size"], "moe.every_n_layers": 1, "moe.score": "softmax",
                       "moe.norm_topk": True, "moe.capacity_factor": None, "moe.shared_expert": False,
                       "moe.aux_loss_coef": hf.get("router_aux_loss_coef", 0.01)})
    return fields


def _flat(section: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"moe": {"top_k": 2}} -> {"moe.top_k": 2}"""
    out = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def merge(model: dict[str, Any], user_layers: list[dict[str, Any]], path: str, seq_len: int) -> dict[str, Any]:
    """`model` (the merged model section) with `path`'s values filled in. A value the user set (in any of
    `user_layers`, the model sections of the YAML and the overrides) that differs from config.json's is refused
    naming both; max_seq_len (the RoPE table's length) stays the user's."""
    fields = model_fields(path, seq_len)
    user_set = {key for layer in user_layers for key in _flat(layer)}
    have = _flat(model)
    for key, value in fields.items():
        if key in user_set and key != "max_seq_len" and have.get(key) != value:
            theirs = next((k for k, v in KEYS.items() if v == key), key)
            raise ConfigError(f"model.{key}={have.get(key)!r} conflicts with {theirs}={value!r} in "
                              f"'{path}/config.json' (model.init_from); remove model.{key} from the config and "
                              f"overrides, the model's own config sets it")
    if "max_seq_len" in user_set:
        fields.pop("max_seq_len")
    moe = {key[len("moe."):]: fields.pop(key) for key in list(fields) if key.startswith("moe.")}
    return {**model, **fields, "moe": {**model.get("moe", {}), **moe}}


def mixtral_mismatch(moe: Any) -> Optional[str]:
    """Why phalanx's MoE section `moe` routes otherwise than Mixtral, or None if it routes the same."""
    wanted = {"every_n_layers": 1, "score": "softmax", "norm_topk": True, "capacity_factor": None,
              "shared_expert": False}
    for key, value in wanted.items():
        if getattr(moe, key) != value:
            return f"model.moe.{key}={getattr(moe, key)!r} (Mixtral: {value!r})"
    return None


def hf_config(model: Any, ffn_dim: int, eos_id: Optional[int] = None, bos_id: Optional[int] = None,
              dtype: str = "float32") -> dict[str, Any]:
    """A LlamaForCausalLM (dense) or MixtralForCausalLM (MoE) config.json for phalanx's model section `model`."""
    config = _llama_config(model, ffn_dim, eos_id, bos_id, dtype)
    if not model.moe.num_experts:
        return config
    mismatch = mixtral_mismatch(model.moe)
    if mismatch:
        raise ConfigError(f"this run's MoE routes otherwise than Mixtral ({mismatch}), so no Hugging Face "
                          f"model computes it: export --format safetensors instead")
    config.update({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                   "intermediate_size": model.moe.ffn_dim or ffn_dim, "num_local_experts": model.moe.num_experts,
                   "num_experts_per_tok": model.moe.top_k, "router_aux_loss_coef": model.moe.aux_loss_coef,
                   "router_jitter_noise": 0.0, "sliding_window": None, "output_router_logits": False})
    for key in ("mlp_bias",):
        config.pop(key)
    return config


def _llama_config(model: Any, ffn_dim: int, eos_id: Optional[int], bos_id: Optional[int],
                  dtype: str) -> dict[str, Any]:
    theta = float(model.rope_theta)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "intermediate_size": ffn_dim,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.n_kv_heads or model.n_heads,
        "head_dim": model.d_model // model.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": theta,  # transformers 4
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},  # transformers 5
        "tie_word_embeddings": bool(model.tie_embeddings),
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }
