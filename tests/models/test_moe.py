"""The MoE block on one process: against a per-token reference, capacity priority, balance and z-loss,
per-sequence invariance to micro-batching, the grouped-matmul kernel, aux-loss gradients, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from phalanx.config import ModelConfig, MoEConfig
from phalanx.models import build_on_meta, flops_per_token, materialize
from phalanx.models.experts import grouped_mm_supported, swiglu_experts
from phalanx.models.moe import MoE
from phalanx.models.routing import SequenceShards, _within_capacity, capacity, route
from tests.helpers import assert_refused


def moe_cfg(**moe) -> ModelConfig:
    defaults = dict(num_experts=4, top_k=2, ffn_dim=24)
    return ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=4, max_seq_len=16,
                       moe=MoEConfig(**{**defaults, **moe}))


def build_moe(seed: int = 0, **moe) -> MoE:
    layer = MoE(moe_cfg(**moe))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return layer


def per_token_reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Each token through its top-k experts one at a time: the plainest statement of an MoE layer."""
    cfg = layer.cfg
    logits = x.float() @ layer.router.weight.T
    scores = logits.softmax(-1) if cfg.score == "softmax" else logits.sigmoid()
    out = torch.zeros_like(x)
    w1, w3, w2 = layer.experts.w1, layer.experts.w3, layer.experts.w2
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            weights, experts = scores[b, t].topk(cfg.top_k)
            if cfg.top_k > 1 and (cfg.norm_topk or cfg.score == "sigmoid"):
                weights = weights / weights.sum()
            for w, e in zip(weights, experts):
                out[b, t] += w * ((F.silu(x[b, t] @ w1[e]) * (x[b, t] @ w3[e])) @ w2[e])
    if layer.shared is not None:
        out = out + layer.shared(x)
    return out


@pytest.mark.parametrize("moe", [dict(), dict(top_k=1), dict(score="sigmoid", top_k=3), dict(shared_expert=True),
                                 dict(kernel="loop"), dict(kernel="grouped_mm", norm_topk=False)])
def test_dropless_layer_equals_the_per_token_reference(moe):
    layer = build_moe(**moe)
    x = torch.randn(3, 8, 16)
    torch.testing.assert_close(layer(x), per_token_reference(layer, x), rtol=1e-5, atol=1e-6)


def test_capacity_keeps_first_choices_before_second_choices_then_token_order():
    # 4 tokens, 2 experts, k=2. Tokens 0, 1 choose expert 0 second; tokens 2, 3 choose it first.
    top_e = torch.tensor([[[1, 0], [1, 0], [0, 1], [0, 1]]])  # (B=1, T=4, k=2)
    keep = _within_capacity(F.one_hot(top_e, 2), cap=3, seq=SequenceShards())
    # expert 0: first choices of tokens 2, 3, then the second choice of token 0; token 1's is dropped.
    # expert 1: first choices of tokens 0, 1, then token 2's second choice; token 3's is dropped.
    assert keep.tolist() == [[[True, True], [True, False], [True, True], [True, False]]]
    assert capacity(1.25, seq_len=128, top_k=2, num_experts=8) == 40


def test_uniform_router_balance_loss_is_one_and_z_loss_is_log_e_squared():
    cfg = moe_cfg(num_experts=8).moe
    routing = route(torch.randn(2, 6, 16), torch.zeros(8, 16), cfg, SequenceShards())
    assert routing.aux_loss.item() == pytest.approx(1.0)  # E * sum_e f_e / E, whatever f
    assert routing.z_loss.item() == pytest.approx(math.log(8) ** 2)


def test_routing_is_per_sequence_so_micro_batching_changes_nothing():
    cfg = moe_cfg(capacity_factor=1.0).moe
    weight, x = torch.randn(4, 16), torch.randn(4, 8, 16)
    whole = route(x, weight, cfg, SequenceShards())
    halves = [route(part, weight, cfg, SequenceShards()) for part in x.chunk(2)]
    assert torch.equal(whole.keep, torch.cat([h.keep for h in halves]))
    assert 0 < (~whole.keep).sum()
    assert whole.aux_loss.item() == pytest.approx(sum(h.aux_loss.item() for h in halves) / 2, rel=1e-6)


@pytest.mark.skipif(not grouped_mm_supported(torch.device("cpu"), torch.float32, 16), reason="no torch._grouped_mm")
def test_grouped_mm_kernel_equals_the_loop_forward_and_backward_with_an_idle_expert():
    torch.manual_seed(0)
    w1, w3, w2 = ((torch.randn(shape) * 0.3).requires_grad_() for shape in ((4, 16, 24), (4, 16, 24), (4, 24, 16)))
    x = torch.randn(10, 16, requires_grad=True)
    counts = torch.tensor([3, 0, 5, 2])  # expert 1 gets nothing: its gradient must be zero
    grads = []
    for kernel in ("grouped_mm", "loop"):
        out = swiglu_experts(x, w1, w3, w2, counts, kernel)
        (out * torch.arange(16.0)).sum().backward()
        grads.append((out.detach(), x.grad.clone(), w1.grad.clone(), w3.grad.clone(), w2.grad.clone()))
        for t in (x, w1, w3, w2):
            t.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert grads[0][2][1].abs().sum() == 0


def test_aux_losses_reach_the_router_as_if_added_to_the_loss():
    layer = build_moe(aux_loss_coef=0.5, z_loss_coef=0.1)
    x = torch.randn(2, 8, 16)
    layer.loss_scale = 0.25
    layer(x).sum().backward()
    injected = layer.router.weight.grad.clone()
    layer.router.weight.grad = None
    layer.eval()  # no injection: add the losses by hand
    out = layer(x).sum()
    routing = route(x, layer.router.weight, layer.cfg, SequenceShards())
    (out + 0.25 * (0.5 * routing.aux_loss + 0.1 * routing.z_loss)).backward()
    torch.testing.assert_close(injected, layer.router.weight.grad)


def test_model_places_moe_every_n_layers_and_counts_active_flops():
    cfg = moe_cfg(every_n_layers=2)
    model = materialize(build_on_meta(cfg), torch.device("cpu"), 0)
    assert [type(b.mlp).__name__ for b in model.layers.values()] == ["SwiGLU", "MoE"]
    assert model(torch.randint(0, 64, (2, 8))).shape == (2, 8, 64)
    dense = materialize(build_on_meta(moe_cfg(num_experts=0)), torch.device("cpu"), 0)
    d, m = cfg.d_model, cfg.moe
    active_moe = d * m.num_experts + m.top_k * 3 * d * m.ffn_dim
    dense_mlp = 3 * d * model.layers["0"].mlp.w1.weight.shape[0]
    assert flops_per_token(cfg, 16) == flops_per_token(dense.cfg, 16) + 6 * (active_moe - dense_mlp)


@pytest.mark.parametrize("override,words", [
    ("model.moe.top_k=5", ["model.moe.top_k=5", "num_experts(4)"]),
    ("model.moe.every_n_layers=9", ["every_n_layers=9", "n_layers(4)"]),
    ("model.moe.capacity_factor=0", ["model.moe.capacity_factor=0", "> 0"]),
    ("model.moe.score=relu", ["model.moe.score='relu'", "softmax, sigmoid"]),
    ("model.moe.kernel=triton", ["model.moe.kernel='triton'", "grouped_mm"]),
])
def test_invalid_moe_settings_are_refused(override, words):
    assert_refused(["model.moe.num_experts=4", override], words)
