"""Expert parallelism on gloo: one step equals one process holding every expert.

Dropless: loss and every gradient within rtol 1e-5 / atol 1e-7 (fp32; ranks sum in another order).
Capacity mode: the experts chosen and the dropped-assignment masks equal the one-process ones exactly.
"""

from __future__ import annotations

import gc
import tempfile

import pytest
import torch
import torch.distributed as dist

from phalanx.config import load_config
from phalanx.launch.run import init_distributed
from phalanx.parallel import validate
from phalanx.parallel.dist import shutdown
from phalanx.trainer import Trainer
from tests.helpers import CONFIG, TINY, assert_refused
from tests.parallel.harness import assert_same_step, fresh_seed, reference_one_step, spawn, spawn_one_step

pytestmark = pytest.mark.slow

MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_dim=64"]

# layout -> (processes, overrides): ep borrows from dp x sp (ep must divide dp * sp). ep4 and ep2xdp2 are the same
# 4 ranks and batch at two ep degrees, with a balance loss that weighs in the gradients (aux_loss_coef=1).
BALANCE = ["train.micro_batch_size=2", "model.moe.aux_loss_coef=1.0"]
LAYOUTS = {
    "ep2": (2, ["parallel.dp=2", "parallel.ep=2"]),
    "ep4": (4, ["parallel.dp=4", "parallel.ep=4", *BALANCE]),
    "ep2xdp2": (4, ["parallel.dp=4", "parallel.ep=2", *BALANCE]),
    "ep2xsp2": (4, ["parallel.dp=2", "parallel.sp=2", "parallel.ep=2"]),
    "ep2-sp2-only": (2, ["parallel.dp=1", "parallel.sp=2", "parallel.ep=2", "model.moe.score=sigmoid"]),
    "ep2-fsdp": (2, ["parallel.dp=2", "parallel.ep=2", "parallel.dp_backend=fsdp", "model.moe.shared_expert=true"]),
    "ep4-top1-fsdp-sp2": (4, ["parallel.dp=2", "parallel.sp=2", "parallel.ep=4", "parallel.dp_backend=fsdp",
                              "model.moe.top_k=1"]),
    # ep = 1: experts are ordinary weights of the data-parallel back end (FSDP shards them, ZeRO partitions)
    "fsdp2-ep1": (2, ["parallel.dp=2", "parallel.dp_backend=fsdp"]),
    "zero2-ep1": (2, ["parallel.dp=2", "parallel.dp_backend=zero", "parallel.zero_stage=2"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dropless_step_matches_one_process(layout):
    world, overrides = LAYOUTS[layout]
    overrides = [*MOE, *overrides, *fresh_seed()]
    got, ref = spawn_one_step(overrides, world), reference_one_step(overrides)
    assert_same_step(got, ref)
    for key in ("moe_aux_loss", "moe_z_loss", "moe_imbalance"):  # the balance loss, z-loss and load
        assert got["moe"][key] == pytest.approx(ref["moe"][key], rel=1e-6), key
    assert got["moe"]["moe_dropped"] == ref["moe"]["moe_dropped"] == 0.0


def routing_step(overrides: list[str], world: int) -> dict:
    """Rank 0 gets every layer's (experts, kept) of the whole global batch, (B, T, k) each, in global order."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = validate(load_config(CONFIG, [*TINY, *overrides, f"run.dir={run_dir}"]), world)
        ctx = init_distributed(cfg)
        try:
            trainer = Trainer(cfg, ctx, run_dir)
            for layer in trainer.moe_layers:
                layer.trace = []
            trainer.forward_backward(trainer.data.next_step())
            local = [tuple(torch.cat(part) for part in zip(*layer.trace)) for layer in trainer.moe_layers]
            where = (ctx.coord("dp")[0], ctx.coord("sp")[0])
            pieces = [None] * world
            if ctx.distributed:
                dist.all_gather_object(pieces, (where, local))
                dist.barrier()
            else:
                pieces = [(where, local)]
            del trainer
            gc.collect()
        finally:
            shutdown()
    # Assemble: dp ranks hold consecutive samples, sp ranks consecutive tokens.
    layers = []
    for i in range(len(pieces[0][1])):
        rows = {}
        for (dp, sp), local in pieces:
            rows.setdefault(dp, {})[sp] = local[i]
        experts = torch.cat([torch.cat([rows[d][s][0] for s in sorted(rows[d])], 1) for d in sorted(rows)])
        kept = torch.cat([torch.cat([rows[d][s][1] for s in sorted(rows[d])], 1) for d in sorted(rows)])
        layers.append((experts, kept))
    return {"layers": layers}


@pytest.mark.parametrize("world,layout", [
    (2, ["parallel.dp=2", "parallel.ep=2"]),
    (4, ["parallel.dp=2", "parallel.sp=2", "parallel.ep=4"]),
    (4, ["parallel.dp=1", "parallel.sp=4", "parallel.ep=2", "model.n_kv_heads=1", "model.moe.top_k=3"]),
], ids=["ep2", "ep4xsp2", "ep2xsp4-top3"])
def test_capacity_mode_drops_the_same_assignments(world, layout):
    overrides = [*MOE, "model.moe.capacity_factor=1.0", *layout, *fresh_seed()]
    got = spawn(routing_step, world, overrides, world)["layers"]
    ref = routing_step([o for o in overrides if not o.startswith("parallel.")], 1)["layers"]
    for (experts, kept), (ref_experts, ref_kept) in zip(got, ref):
        assert experts.shape == ref_experts.shape == (8, 32, kept.shape[-1])
        assert torch.equal(experts, ref_experts)
        assert torch.equal(kept, ref_kept)
        assert 0 < (~kept).sum() < kept.numel() / 2  # the test exercises dropping


@pytest.mark.parametrize("overrides,world,words", [
    (["parallel.dp=2", "parallel.ep=2"], 2, ["parallel.ep=2", "model.moe.num_experts=0"]),
    (["parallel.dp=2", "parallel.ep=2", "model.moe.num_experts=3"], 2, ["num_experts(3)", "parallel.ep(2)"]),
    (["parallel.dp=2", "parallel.ep=2", "model.moe.num_experts=4", "parallel.dp_backend=zero"], 2,
     ["dp_backend=zero", "ddp or fsdp"]),
    (["parallel.dp=2", "parallel.ep=2", "model.moe.num_experts=4", "parallel.ep_backend=deepspeed"], 2,
     ["parallel.ep_backend='deepspeed'", "alltoall"]),
    (["parallel.dp=2", "parallel.ep=4", "model.moe.num_experts=4"], 2, ["parallel.ep(4)", "dp(2) * sp(1) = 2"]),
])
def test_invalid_expert_layouts_are_refused(overrides, world, words):
    assert_refused(overrides, words, world)
