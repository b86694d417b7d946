"""Hugging Face in and out: a `transformers` LlamaForCausalLM (random weights, save_pretrained) loads through
`model.init_from: hf:DIR` into every layout with its own logits, and a trained run exports back to a folder that
`from_pretrained` loads with phalanx's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phalanx.cli import main
from phalanx.config import load_config
from phalanx.errors import ConfigError
from phalanx.models import build_on_meta, materialize
from phalanx.parallel import validate
from tests.checkpoint.test_tools import make_trainer
from tests.helpers import CONFIG, TINY
from tests.parallel.harness import full_params, one_step, spawn

transformers = pytest.importorskip("transformers")

# TINY's model (d 64, 2 layers, 4 heads, 2 kv heads: GQA) with SwiGLU width 192 as phalanx rounds it
LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0)
LAYOUTS = {  # world, overrides
    "dp2": (2, ["parallel.dp=2"]),
    "sp2": (2, ["parallel.sp=2", "parallel.dp=1"]),
    "pp2": (2, ["parallel.pp=2", "parallel.dp=1"]),
    "fsdp-dp2": (2, ["parallel.dp=2", "parallel.dp_backend=fsdp"]),
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(1234)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)  # one model.safetensors
    model.save_pretrained(path / "sharded", max_shard_size="200KB")  # model-0000i-of-0000n + the index
    assert len(list((path / "sharded").glob("model-*.safetensors"))) > 1
    return path, model


def test_a_transformers_llama_loads_into_every_layout_with_its_logits(llama, tmp_path):
    path, hf = llama
    init = [f"model.init_from=hf:{path / 'sharded'}", "run.seed=7"]
    cfg = validate(load_config(CONFIG, [*TINY, *init]))
    ours = materialize(build_on_meta(cfg.model), torch.device("cpu"), 0, cfg.model.init_from).eval()
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-6)
    want = full_params(ours)
    ref = one_step(init, 1, str(tmp_path))
    for name, (world, layout) in LAYOUTS.items():
        (tmp_path / name).mkdir()
        got = spawn(one_step, world, [*init, *layout], world, str(tmp_path / name), False, True)
        assert got["params"].keys() == want.keys(), name
        for key, value in want.items():
            assert torch.equal(got["params"][key], value), f"{name}: {key} differs from the one-process load"
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), name


def test_a_run_started_from_hf_weights_exports_to_a_folder_transformers_loads(llama, tmp_path, capsys):
    path, _ = llama
    trainer = make_trainer(tmp_path, f"model.init_from=hf:{path}", "train.steps=1", "checkpoint.persist_every=1",
                           "checkpoint.sign=false")
    trainer.fit()
    run = str(trainer.run_dir)
    assert main(["ckpt", "export", run, "--step", "1", "--format", "hf"]) == 0
    out = Path(run) / "export" / "step-1-hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    model = trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, model(tokens), rtol=1e-5, atol=1e-6)
        assert not torch.equal(model.output.weight, llama[1].lm_head.weight)  # it trained a step
    assert main(["ckpt", "export", run, "--step", "1", "--format", "hf"]) != 0
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["ckpt", "export", run, "--step", "1", "--format", "hf", "--force"]) == 0


def test_hf_config_values_fill_the_model_section_and_a_conflicting_override_is_refused(llama, tmp_path):
    path, _ = llama
    cfg = load_config(CONFIG, [*TINY, f"model.init_from=hf:{path}"])
    assert (cfg.model.ffn_dim, cfg.model.norm_eps, cfg.model.max_seq_len) == (192, 1e-5, 32)  # user's seq length
    with pytest.raises(ConfigError, match=r"model.d_model=128 conflicts with hidden_size=64 in .*config.json"):
        load_config(CONFIG, [f"model.init_from=hf:{path}"])  # tiny.yaml's d_model is 128
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    config = json.loads((path / "config.json").read_text())
    (scaled / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "llama3"}}))
    with pytest.raises(ConfigError, match="RoPE type 'llama3'"):
        load_config(CONFIG, [*TINY, f"model.init_from=hf:{scaled}"])
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(CONFIG, [*TINY, f"model.init_from=hf:{tmp_path}"])


def test_a_mixtral_loads_into_phalanx_moe_sharded_over_ep_and_exports_back(tmp_path):
    torch.manual_seed(99)
    config = transformers.MixtralConfig(**{**LLAMA, "intermediate_size": 96}, num_local_experts=4,
                                        num_experts_per_tok=2)
    hf = transformers.MixtralForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "mixtral")
    init = [f"model.init_from=hf:{tmp_path / 'mixtral'}", "run.seed=7"]
    cfg = validate(load_config(CONFIG, [*TINY, *init]))
    assert (cfg.model.moe.num_experts, cfg.model.moe.top_k, cfg.model.moe.ffn_dim) == (4, 2, 96)
    ours = materialize(build_on_meta(cfg.model), torch.device("cpu"), 0, cfg.model.init_from).eval()
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-6)
    (tmp_path / "ep2").mkdir()
    got = spawn(one_step, 2, [*init, "parallel.dp=2", "parallel.ep=2"], 2, str(tmp_path / "ep2"), False, True)
    for key, value in full_params(ours).items():
        assert torch.equal(got["params"][key], value), f"ep2: {key} differs from the one-process load"
    assert got["loss"] == pytest.approx(one_step(init, 1, str(tmp_path))["loss"], rel=1e-5)
    trainer = make_trainer(tmp_path / "run", *init, "train.steps=1", "checkpoint.persist_every=1",
                           "checkpoint.sign=false")
    trainer.fit()
    assert main(["ckpt", "export", str(trainer.run_dir), "--format", "hf", "--out", str(tmp_path / "out")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, trainer.model.eval()(tokens), rtol=1e-5, atol=1e-6)
