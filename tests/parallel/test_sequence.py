"""Ulysses sequence parallelism: parity with one process, GQA handling, refusals, bytes."""

from __future__ import annotations

import pytest

from phalanx.config import load_config
from phalanx.parallel import validate
from phalanx.parallel.sequence import kv_repeat
from tests.helpers import CONFIG, assert_refused
from tests.parallel.harness import assert_same_step, fresh_seed, reference_one_step, spawn_one_step

pytestmark = pytest.mark.slow

# fp32 on CPU. The attention kernel sees the same numbers; sums over tokens are split differently
# across ranks, so results agree to rounding (observed ~1e-7 relative), not bitwise.
LAYOUTS = {
    "dp2": (2, ["parallel.dp=2"]),
    "sp2": (2, ["parallel.sp=2"]),
    "dp2xsp2": (4, ["parallel.dp=2", "parallel.sp=2"]),
    "sp4": (4, ["parallel.sp=4", "model.n_heads=4", "model.n_kv_heads=1"]),  # MQA: kv heads replicated
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_step_matches_one_process(layout):
    world, overrides = LAYOUTS[layout]
    overrides = [*overrides, *fresh_seed()]
    assert_same_step(spawn_one_step(overrides, world), reference_one_step(overrides))


def test_kv_heads_fewer_than_sp_are_replicated_not_refused():
    assert kv_repeat(n_heads=8, n_kv_heads=4, sp=2) == 1
    assert kv_repeat(n_heads=8, n_kv_heads=2, sp=4) == 2
    assert kv_repeat(n_heads=8, n_kv_heads=1, sp=8) == 8
    assert kv_repeat(n_heads=12, n_kv_heads=3, sp=2) == 4  # neither divides: full multi-head expansion
    validate(load_config(CONFIG, ["parallel.sp=4", "model.n_heads=4", "model.n_kv_heads=1"]), world_size=4)


@pytest.mark.parametrize("overrides,world,words", [
    (["parallel.sp=2", "data.seq_len=127"], 2, ["data.seq_len(127)", "parallel.sp(2)", "multiple of 2"]),
    (["parallel.sp=4", "model.n_heads=2", "model.n_kv_heads=1", "model.d_model=128"], 4,
     ["model.n_heads(2)", "parallel.sp(4)", "[1, 2]"]),
    (["parallel.sp=2", "parallel.sp_backend=ring"], 2, ["parallel.sp_backend='ring'", "ulysses"]),
])
def test_invalid_sequence_layouts_are_refused(overrides, world, words):
    assert_refused(overrides, words, world)


def test_all_to_all_bytes_equal_the_analytic_value_and_stay_constant_as_seq_and_sp_double():
    """Per rank and layer, what Ulysses sends depends on seq_len / sp only."""
    from phalanx.config import ModelConfig
    from phalanx.parallel.sequence import all_to_all_bytes

    sent = {}
    for sp, seq in ((2, 32), (4, 64)):
        overrides = [f"parallel.sp={sp}", f"data.seq_len={seq}", "model.max_seq_len=64", "model.n_kv_heads=4",
                     "parallel.comm_stats=true", "train.micro_batch_size=8", *fresh_seed()]
        row = spawn_one_step(overrides, sp)["comm"]["all_to_all/sp"]
        layers, micro_batches = 2, 1
        model = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4)
        assert row["calls"] == layers * micro_batches * 4  # packed qkv and out forward; their gradients backward
        expected = all_to_all_bytes(model, sp, batch=8, seq_len=seq)
        assert row["bytes"] == layers * micro_batches * expected
        sent[sp] = row["bytes"] / layers
    assert sent[2] == sent[4]


def _ulysses_vs_deepspeed(n_heads: int, n_kv_heads: int, seed: int) -> dict:
    """On every rank: the same global q, k, v; each rank feeds its sequence shard to both layers."""
    import torch
    import torch.distributed as dist
    from deepspeed.sequence.layer import DistributedAttention

    from phalanx.models.gpt import CoreAttention
    from phalanx.parallel.sequence import UlyssesAttention
    from phalanx.parallel.zero import no_shared_memory_all_reduce

    import deepspeed

    dist.init_process_group("gloo")
    no_shared_memory_all_reduce()  # else DeepSpeed's CPU comm compiles a C++ op first (82 s in a new environment)
    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's comm wraps the torch group
    try:
        sp, rank = dist.get_world_size(), dist.get_rank()
        group = dist.new_group(list(range(sp)))
        g = torch.Generator().manual_seed(seed)
        B, T, D = 2, 16, 8
        q = torch.randn(B, T, n_heads, D, generator=g)
        k, v = torch.randn(2, B, T, n_kv_heads, D, generator=g)
        grad_out = torch.randn(B, T, n_heads, D, generator=g)
        lo, hi = rank * T // sp, (rank + 1) * T // sp
        results = {}
        for name, layer in {
            "phalanx": UlyssesAttention(CoreAttention(), group, sp, repeat=1),
            "deepspeed": DistributedAttention(CoreAttention(), group, scatter_idx=2, gather_idx=1),
        }.items():
            ql, kl, vl = (t[:, lo:hi].clone().requires_grad_() for t in (q, k, v))
            out = layer(ql, kl, vl) if name == "phalanx" else layer(ql, kl, vl, 0)
            out.backward(grad_out[:, lo:hi])
            local = {"out": out.detach(), "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
            gathered = {}
            for key, value in local.items():  # whole-sequence tensors, to compare on rank 0
                parts = [torch.empty_like(value) for _ in range(sp)]
                dist.all_gather(parts, value.contiguous())
                gathered[key] = torch.cat(parts, dim=1)
            results[name] = gathered
        return results
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_ulysses_equals_deepspeed_distributed_attention(n_heads, n_kv_heads):
    import random

    import torch

    from tests.parallel.harness import spawn

    seed = random.SystemRandom().randrange(1 << 30)
    print(f"seed={seed}")
    got = spawn(_ulysses_vs_deepspeed, 2, n_heads, n_kv_heads, seed)
    for key in ("out", "dq", "dk", "dv"):
        torch.testing.assert_close(got["phalanx"][key], got["deepspeed"][key], rtol=1e-6, atol=1e-7)
        assert got["phalanx"][key].abs().sum() > 0
