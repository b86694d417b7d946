"""The GPT: meta build + deterministic materialisation, causality, GQA, RoPE, swappable seams, FLOPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from phalanx.config import ModelConfig
from phalanx.models import build_on_meta, flops_per_token, materialize
from phalanx.models.gpt import CoreAttention, apply_rope, rope_tables
from phalanx.models.mlp import ffn_dim

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)


def build(cfg: ModelConfig = CFG, seed: int = 0):
    return materialize(build_on_meta(cfg), torch.device("cpu"), seed)


def test_meta_build_allocates_nothing_until_materialised():
    model = build_on_meta(CFG)
    assert all(p.is_meta for p in model.parameters())
    materialize(model, torch.device("cpu"), 0)
    assert not any(p.is_meta for p in model.parameters())


def test_same_seed_same_weights_different_seed_different():
    a, b, c = build(seed=1), build(seed=1), build(seed=2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name


def test_shapes_and_causality():
    model = build()
    tokens = torch.randint(0, 64, (2, 16))
    logits = model(tokens)  # (B, T, V)
    assert logits.shape == (2, 16, 64)
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 64
    assert torch.allclose(model(changed)[:, :10], logits[:, :10], atol=1e-6)
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])


def test_gqa_equals_attention_with_repeated_kv_heads():
    q = torch.randn(2, 8, 4, 8)
    k, v = torch.randn(2, 8, 2, 8), torch.randn(2, 8, 2, 8)
    out = CoreAttention()(q, k, v)
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, dim=2).transpose(1, 2), v.repeat_interleave(2, dim=2).transpose(1, 2),
        is_causal=True,
    ).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-6)


def test_rope_is_a_rotation_and_relative():
    cos, sin = rope_tables(8, 16, 10000.0, torch.device("cpu"))
    x = torch.randn(1, 16, 2, 8)
    rotated = apply_rope(x, cos, sin)
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    # q.k depends only on the distance: shifting both positions by 3 keeps the score.
    q, k = torch.randn(8), torch.randn(8)
    def score(i, j):
        qi = apply_rope(q.view(1, 1, 1, 8), cos[i:i + 1], sin[i:i + 1])
        kj = apply_rope(k.view(1, 1, 1, 8), cos[j:j + 1], sin[j:j + 1])
        return (qi * kj).sum()
    assert torch.allclose(score(5, 2), score(8, 5), atol=1e-5)


def test_positions_override_matches_slice_of_full_sequence():
    """A sequence shard with offset positions sees the same RoPE as inside the full sequence (Ulysses seam)."""
    model = build()
    tokens = torch.randint(0, 64, (1, 16))
    emb = model.tok_embeddings(tokens)
    cos, sin = model.rope_cos[8:16], model.rope_sin[8:16]
    positions = torch.arange(8, 16)
    assert torch.equal(model.rope_cos[positions], cos) and torch.equal(model.rope_sin[positions], sin)
    assert emb.shape == (1, 16, 32)


def test_swappable_core_attention_and_mlp():
    model = build()
    calls = []

    class CountingCore(CoreAttention):
        def forward(self, q, k, v):
            calls.append(q.shape)
            return super().forward(q, k, v)

    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    tokens = torch.randint(0, 64, (2, 16))
    before = model(tokens)
    for block in model.layers.values():
        block.attn.core = CountingCore()
    assert torch.equal(model(tokens), before) and len(calls) == CFG.n_layers
    model.layers["1"].mlp = Zero()
    assert not torch.allclose(model(tokens), before)


def test_layers_are_indexed_by_stable_names():
    model = build()
    del model.layers["0"]  # what a pipeline stage does
    assert list(model.layers.keys()) == ["1"]
    assert any(k.startswith("layers.1.") for k in model.state_dict())


def test_tied_embeddings_share_one_tensor():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=16, tie_embeddings=True)
    model = build(cfg)
    assert model.output.weight is model.tok_embeddings.weight
    untied = build(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=16))
    assert untied.num_params() - model.num_params() == 64 * 32


def test_flops_per_token_is_6n_plus_attention():
    model = build()
    matmul_params = model.num_params() - model.tok_embeddings.weight.numel() - sum(
        p.numel() for n, p in model.named_parameters() if "norm" in n)
    T = 16
    assert flops_per_token(CFG, T) == 6 * matmul_params + 12 * CFG.n_layers * CFG.d_model * T
    assert ffn_dim(CFG) % CFG.multiple_of == 0
