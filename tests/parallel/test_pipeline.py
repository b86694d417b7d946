"""Pipeline parallelism on gloo: one step equals one process for every schedule and mix; the stage split.

Tolerance as for the other layouts: loss rtol 1e-5, every gradient rtol 1e-5 / atol 1e-7 (fp32; the
pipeline sums micro-batch gradients in the same order as one process, data parallelism does not).
"""

from __future__ import annotations

import pytest

from phalanx.config import load_config
from phalanx.models import build_on_meta
from phalanx.parallel import validate
from phalanx.parallel.pipeline import balanced_split, plan_stages
from tests.helpers import CONFIG, assert_refused
from tests.parallel.harness import assert_same_step, fresh_seed, reference_one_step, spawn_one_step

MOE = ["model.moe.num_experts=4", "model.moe.ffn_dim=64"]

# layout -> (processes, overrides); the tiny model has 4 blocks unless a layout says otherwise
LAYOUTS = {
    "pp2-gpipe": (2, ["parallel.pp=2", "parallel.pp_schedule=gpipe"]),
    "pp2-1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "pp2-interleaved": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved"]),
    "pp4-1f1b": (4, ["parallel.pp=4", "train.micro_batch_size=2"]),
    "pp4-gpipe-uneven": (4, ["parallel.pp=4", "parallel.pp_schedule=gpipe", "train.micro_batch_size=2",
                             "model.n_layers=6", "parallel.pp_split=[2,1,1,2]"]),
    "pp2xdp2": (4, ["parallel.pp=2", "parallel.dp=2", "train.micro_batch_size=2"]),
    "pp2xsp2": (4, ["parallel.pp=2", "parallel.dp=1", "parallel.sp=2"]),
    "pp2xep2-moe": (4, ["parallel.pp=2", "parallel.dp=2", "parallel.ep=2", "train.micro_batch_size=2", *MOE]),
    "pp2xfsdp2": (4, ["parallel.pp=2", "parallel.dp=2", "parallel.dp_backend=fsdp", "train.micro_batch_size=2"]),
    "pp4-interleaved": (4, ["parallel.pp=4", "parallel.pp_schedule=interleaved", "model.n_layers=8",
                            "train.micro_batch_size=1"]),
    "pp2-interleaved-accumulation": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved", "train.micro_batch_size=1",
                                         "parallel.microbatches=4"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_step_matches_one_process(layout):
    world, overrides = LAYOUTS[layout]
    overrides = ["model.n_layers=4", *overrides, *fresh_seed()]
    assert_same_step(spawn_one_step(overrides, world), reference_one_step(overrides))


def test_balanced_split_minimises_the_largest_stage():
    # 6 equal blocks, a heavy embedding and head: the end stages take fewer blocks
    assert balanced_split([10] * 6, first_extra=25, last_extra=25, stages=3) == [1, 4, 1]
    assert balanced_split([10] * 4, 0, 0, 2) == [2, 2]
    assert balanced_split([1, 1, 1, 9], 0, 0, 2) == [3, 1]
    assert sum(balanced_split([3, 1, 4, 1, 5, 9, 2, 6], 2, 7, 4)) == 8


def test_plan_stages_puts_embedding_first_and_head_last_and_loops_interleaved_stages():
    cfg = validate(load_config(CONFIG, ["model.n_layers=8", "parallel.pp=2", "parallel.pp_schedule=interleaved"]), 2)
    plans = plan_stages(build_on_meta(cfg.model), cfg)
    assert len(plans) == 4 and [p.first for p in plans] == [True, False, False, False]
    assert [p.last for p in plans] == [False, False, False, True]
    assert [name for p in plans for name in p.blocks] == [str(i) for i in range(8)]


@pytest.mark.parametrize("overrides,world,words", [
    (["parallel.pp=4", "model.n_layers=3"], 4, ["model.n_layers(3)", "stages (4 = pp(4))"]),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved", "model.n_layers=3"], 2, ["pp_virtual_stages(2)"]),
    (["parallel.pp=4", "train.batch_size=8", "train.micro_batch_size=4"], 4, ["parallel.microbatches=2 < parallel.pp(4)"]),
    (["parallel.pp=2", "parallel.pp_split=[1,2]"], 2, ["parallel.pp_split=[1, 2]", "model.n_layers(4)"]),
    (["parallel.pp=2", "parallel.dp_backend=zero"], 2, ["dp_backend=zero", "ddp or fsdp"]),
    (["parallel.pp=2", "model.tie_embeddings=true"], 2, ["model.tie_embeddings=true"]),
    (["parallel.pp=2", "parallel.microbatches=3"], 2, ["parallel.microbatches=3", "= 2"]),
])
def test_invalid_pipeline_layouts_are_refused(overrides, world, words):
    assert_refused(overrides, words, world)
