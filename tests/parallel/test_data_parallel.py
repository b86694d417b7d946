"""Data-parallel back ends (DDP, FSDP2), alone and with Ulysses: one step equals one process."""

from __future__ import annotations

import pytest

from tests.helpers import assert_refused
from tests.parallel.harness import assert_same_step, fresh_seed, reference_one_step, spawn_one_step

pytestmark = pytest.mark.slow

LAYOUTS = {
    "dp4": (4, ["parallel.dp=4", "train.micro_batch_size=2"]),
    "fsdp2": (2, ["parallel.dp=2", "parallel.dp_backend=fsdp"]),
    "fsdp2xsp2": (4, ["parallel.dp=2", "parallel.sp=2", "parallel.dp_backend=fsdp"]),
    "fsdp2-accumulation": (2, ["parallel.dp=2", "parallel.dp_backend=fsdp", "train.micro_batch_size=2"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_step_matches_one_process(layout):
    world, overrides = LAYOUTS[layout]
    overrides = [*overrides, *fresh_seed()]
    assert_same_step(spawn_one_step(overrides, world), reference_one_step(overrides))


ZERO = {
    "zero1-dp2": (2, ["parallel.dp=2", "parallel.dp_backend=zero", "parallel.zero_stage=1"]),
    "zero2-dp2": (2, ["parallel.dp=2", "parallel.dp_backend=zero", "parallel.zero_stage=2"]),
    "zero3-dp2": (2, ["parallel.dp=2", "parallel.dp_backend=zero", "parallel.zero_stage=3"]),
    "zero2-dp2xsp2": (4, ["parallel.dp=2", "parallel.sp=2", "parallel.dp_backend=zero", "parallel.zero_stage=2"]),
}


@pytest.mark.parametrize("layout", list(ZERO))
def test_zero_one_step_matches_one_process(layout):
    world, overrides = ZERO[layout]
    overrides = [*overrides, *fresh_seed()]
    assert_same_step(spawn_one_step(overrides, world), reference_one_step(overrides))


@pytest.mark.parametrize("overrides,world,words", [
    (["parallel.dp_backend=zero", "parallel.zero_stage=4"], 2, ["parallel.zero_stage=4", "1, 2, 3"]),
    (["parallel.dp_backend=zero", "train.compile=true"], 2, ["train.compile=true", "dp_backend=zero", "ddp or fsdp"]),
    (["parallel.dp_backend=fsdp2"], 2, ["parallel.dp_backend='fsdp2'", "ddp, fsdp, zero"]),
    (["parallel.dp=2", "parallel.sp=2", "parallel.ep=3"], 4, ["parallel.ep(3)", "dp(2) * sp(2) = 4"]),
    (["parallel.dp=2", "parallel.sp=2"], 8, ["dp(2) * sp(2) * pp(1) = 4 != WORLD_SIZE(8)"]),
    (["parallel.dp=auto", "parallel.sp=3"], 4, ["WORLD_SIZE(4)", "pp(1) * sp(3) = 3"]),
])
def test_invalid_data_parallel_mixes_are_refused(overrides, world, words):
    assert_refused(overrides, words, world)
