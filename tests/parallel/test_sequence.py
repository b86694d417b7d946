"""Ulysses sequence parallelism: parity with one process, GQA handling, refusals, bytes."""

from __future__ import annotations

import pytest

from phalanx.config import load_config, validate
from phalanx.errors import ConfigError
from phalanx.parallel.sequence import kv_repeat
from tests.helpers import CONFIG
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
    with pytest.raises(ConfigError) as err:
        validate(load_config(CONFIG, overrides), world_size=world)
    for word in words:
        assert word in str(err.value)


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
        assert row["calls"] == layers * micro_batches * 8  # q, k, v, out forward; their gradients backward
        expected = all_to_all_bytes(model, sp, batch=8, seq_len=seq)
        assert row["bytes"] == layers * micro_batches * expected
        sent[sp] = row["bytes"] / layers
    assert sent[2] == sent[4]
