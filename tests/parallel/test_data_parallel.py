"""Data-parallel back ends (DDP, FSDP2, ZeRO), alone and with Ulysses: one step equals one process; a stale DeepSpeed
build lock holds nothing up."""

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


def test_a_stale_deepspeed_build_lock_never_holds_up_a_zero_run(tmp_path):
    """A DeepSpeed op build killed midway leaves `<torch extensions>/<op>/lock` behind, and every later build of
    that op waits on it forever. The one op a CPU ZeRO run would build (the shared-memory all-reduce of
    DeepSpeed's communication back end, set up by `deepspeed.initialize`) is never built: with a stale lock
    planted, setting up DeepSpeed's communication returns at once, building nothing."""
    import subprocess
    import sys

    from tests.helpers import REPO, loopback_env

    lock = tmp_path / "py_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    script = ("from phalanx.parallel.zero import no_shared_memory_all_reduce\n"
              "no_shared_memory_all_reduce()\n"
              "from deepspeed.comm.torch import build_shm_op\n"
              "assert build_shm_op() is None\n")
    env = {**loopback_env(), "TORCH_EXTENSIONS_DIR": str(tmp_path / "py_cpu")}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert lock.exists() and list(lock.parent.iterdir()) == [lock]  # nothing was built beside it
