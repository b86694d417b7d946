"""State has no layout in it: a run trained at layout A and resumed at layout B trains on as the run that stayed
at A did — every loss after the change within 1e-5 relative (fp32), the final parameters within 1e-4, the same
global samples step by step — and says it resharded (a `reshard` event: from, to, tier).

Each run at A is a shared reference run of tests/parallel/test_loss_curves.py (20 steps, persisted every 4).
The matrix resumes a copy of it back at its checkpoint of step 16 (what a run that died after that step left
in storage; a copy has no keepers, so it reads storage) at B. The other tests SIGKILL a run at A and relaunch it
in its own folder at B, on the nodes it did not lose: the keepers' memory of layout A is resharded, a block lost
with its node decoded from its erasure group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from phalanx.checkpoint.keeper import node_dir
from phalanx.checkpoint.link import default_keeper_dir, run_identity
from tests.checkpoint.test_recovery import keeper_pid, sigkill
from tests.checkpoint.test_persistent import copy_back
from tests.helpers import (REPO, assert_params_close, events, final_checkpoint, load_checkpoint, losses, metrics,
                           run_overrides, train_local)
from tests.parallel.test_loss_curves import COMMON, LAYOUTS, ONE_PROCESS, STEPS, shared

pytestmark = pytest.mark.slow

# name -> (layout A as test_loss_curves names it, or "one:" + its name for its one-process run;
#          overrides and world of layout B on A's config). pp2 x dp2 -> dp2: the last test, from keeper memory.
# A resumed run persists only at its end (the same trajectory: persisting is not training): fewer writes per run.
AT_THE_END = ["checkpoint.persist_every=0"]
# A killed run's keepers wait for its relaunch (run_overrides' 60 s can pass on a loaded machine before it restores)
WAIT = "checkpoint.keeper_linger_s=600"
FOUR = ["model.n_layers=4"]  # interleaved pp2: 2 model chunks per stage, a block each
# layouts A of the matrix that test_loss_curves does not train: (config, world, overrides)
OWN = {"pp2-interleaved": ("tiny_pp.yaml", 2, ["parallel.dp=1", "parallel.pp_schedule=interleaved", *FOUR])}
MATRIX = {
    "dp2-to-dp1": ("ddp2", ONE_PROCESS, 1),
    "dp1-to-fsdp-dp4": ("one:ddp2", ["parallel.dp=4", "parallel.dp_backend=fsdp"], 4),
    "pp2-interleaved-to-pp2xdp2-1f1b": ("pp2-interleaved", ["parallel.dp=2", "parallel.pp_schedule=1f1b", *FOUR], 4),
    "moe-ep2xdp2-to-ep1-dp2": ("moe-ep2xdp2", ["parallel.ep=1", "parallel.dp=2"], 2),
}


def reference(reference_run, name: str) -> tuple[Path, Path, int]:
    """(config, run folder, world) of layout A."""
    config, world, extra = {**LAYOUTS, **OWN}[name.removeprefix("one:")]
    config = REPO / "configs" / config
    if name.startswith("one:"):
        return config, reference_run(config, 1, *COMMON, *extra, *ONE_PROCESS), 1
    return config, reference_run(config, world, *COMMON, *extra), world


def resume_at(config: Path, ref: Path, root: Path, layout_b: list[str], world: int,
              persist: list[str] = AT_THE_END) -> tuple[Path, int]:
    """A copy of `ref` back at its checkpoint four steps before its end (or the newest before that), relaunched
    at layout B; (run folder, resumed step)."""
    run_dir = root / "t"
    resumed = copy_back(ref, run_dir, STEPS - 4)
    train_local(config, run_overrides(root, *COMMON, *persist, *layout_b), world)
    return run_dir, resumed


def assert_same_trajectory(run_dir: Path, ref: Path, resumed: int, tier: str = "storage") -> None:
    restore = [e for e in events(run_dir) if e["event"] == "restore"][-1]
    reshard = [e for e in events(run_dir) if e["event"] == "reshard"][-1]
    assert restore["restored_from"] == tier and restore["step"] == resumed, restore
    assert reshard["step"] == resumed and reshard["tier"] == tier and reshard["from_layout"] != reshard["to_layout"]
    got, want = losses(run_dir), losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(resumed + 1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])
    samples = {m["step"]: m["samples"] for m in metrics(run_dir)}
    assert samples == {m["step"]: m["samples"] for m in metrics(ref)}  # the same global samples, step by step
    assert_params_close(load_checkpoint(final_checkpoint(run_dir, STEPS), rank_local=False)["model"],
                        load_checkpoint(final_checkpoint(ref, STEPS), rank_local=False)["model"])


@pytest.mark.parametrize("change", [pytest.param(change, marks=shared(MATRIX[change][0].removeprefix("one:")))
                                    for change in MATRIX])
def test_a_resume_at_another_layout_trains_on_as_the_first_layout_did(change, reference_run, tmp_path):
    name, layout_b, world = MATRIX[change]
    config, ref, world_a = reference(reference_run, name)
    run_dir, resumed = resume_at(config, ref, tmp_path / "run", layout_b, world)
    assert_same_trajectory(run_dir, ref, resumed)
    reshard = [e for e in events(run_dir) if e["event"] == "reshard"][-1]
    assert ("re-seeded" in reshard["rng"]) == (world != world_a), reshard  # RNG streams are per rank


@shared("fsdp2xsp2")
def test_a_block_lost_with_its_node_is_decoded_and_resharded(reference_run, tmp_path):
    """FSDP over dp2 x sp2 shards every tensor four ways, so no rank's block can stand in for another's. The run, on
    3 (simulated) nodes (ranks 0, 1 | 2 | 3; erasure k=2, m=1: groups {0, 2} and {3, 1}, the second's parity on node
    1), resumes from storage at 16, is SIGKILLed after step 18 and loses node 2 (rank 3 and its keeper). Relaunched as
    DDP dp2 on nodes 0 and 1, it rebuilds rank 3's block from rank 1's and the parity, reshards the four blocks in
    memory and trains on as the uninterrupted run did."""
    config, ref, _ = reference(reference_run, "fsdp2xsp2")
    root, kill = tmp_path / "run", "fault.inject=[kill:rank=3:step=18]"
    run_dir = root / "t"
    resumed = copy_back(ref, run_dir, STEPS - 4)
    with pytest.raises(RuntimeError, match="died"):
        train_local(config, run_overrides(root, *COMMON, *AT_THE_END, kill, WAIT, "checkpoint.simulate_nodes=3"), 4)
    sigkill(keeper_pid(run_dir, 2))
    train_local(config, run_overrides(root, *COMMON, *AT_THE_END, kill, "checkpoint.simulate_nodes=2", "parallel.sp=1",
                                      "parallel.dp=2", "parallel.dp_backend=ddp"), 2)
    restore = [e for e in events(run_dir) if e["event"] == "restore"][-1]
    assert restore["step"] in (17, 18) and restore["step"] > resumed, restore  # 18 if its commit was not in flight
    assert "rank 3 decoded from erasure parity" in restore["reason"], restore
    assert_same_trajectory(run_dir, ref, restore["step"], tier="keeper (resharded)")
    # and plain DCP, one process, no process group, loads the FSDP-sharded weights the run persisted
    assert_plain_dcp_loads(config, final_checkpoint(ref, resumed), tmp_path / "plain")


def assert_plain_dcp_loads(config: Path, checkpoint: Path, root: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    from phalanx.config import load_config
    from phalanx.models import build_on_meta, materialize
    from phalanx.parallel import validate

    cfg = validate(load_config(str(config), run_overrides(root, *COMMON, *ONE_PROCESS)), 1)
    model = materialize(build_on_meta(cfg.model), torch.device("cpu"), seed=123)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(checkpoint))
    saved = load_checkpoint(checkpoint, rank_local=False)["model"]
    assert saved.keys() == state["model"].keys()
    for name, value in state["model"].items():
        assert torch.equal(value, saved[name]), name


@shared("zero2")
def test_zero_partitions_reshard_to_another_stage_world_and_back_end(reference_run, tmp_path):
    """DeepSpeed's partitions leave no trace in what ZeRO saves: a zero2 dp2 run resumed from storage (step 12) as
    zero3 dp4 trains on as the zero2 run did; SIGKILLed after step 14, it is relaunched as zero3 dp2 from the
    keepers' memory of its four ranks (ZeRO snapshots at its persist steps: every step here), SIGKILLed after
    step 16, relaunched as FSDP dp2 from the memory of its two, and still ends as the zero2 run."""
    config, ref, _ = reference(reference_run, "zero2")
    root, kill = tmp_path / "run", "fault.inject=[kill:rank=3:step=14,kill:rank=1:step=16]"
    run_dir = root / "t"
    resumed = copy_back(ref, run_dir, 12)
    zero3 = [*COMMON, "checkpoint.persist_every=1", kill, WAIT, "parallel.zero_stage=3"]
    for world in (4, 2):
        with pytest.raises(RuntimeError, match="died"):
            train_local(config, run_overrides(root, *zero3, f"parallel.dp={world}"), world)
    resharded = [(e["from_layout"], e["to_layout"]) for e in events(run_dir) if e["event"] == "reshard"]
    assert resharded == [("dp2 zero2 mb2", "dp4 zero3 mb2"), ("dp4 zero3 mb2", "dp2 zero3 mb2")], resharded
    got, want = losses(run_dir), losses(ref)
    for step in range(resumed + 1, 17):
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])
    train_local(config, run_overrides(root, *COMMON, *AT_THE_END, kill, "parallel.dp_backend=fsdp"), 2)
    restore = [e for e in events(run_dir) if e["event"] == "restore"][-1]
    # the newest snapshot committed before the kill (16; 15 if 16's commit was in flight)
    assert restore["step"] in (15, 16) and "dp2 zero3" in restore["reason"], restore
    assert_same_trajectory(run_dir, ref, restore["step"], tier="keeper (resharded)")


@shared("pp2xdp2")
def test_a_run_that_lost_a_node_goes_on_on_the_survivor_from_keeper_memory(reference_run, tmp_path):
    """Elastic: a pp2 x dp2 run on 4 ranks over 2 (simulated) nodes, each node one whole replica (parallel.order
    dp,pp,sp), resumed from storage at 16, loses node 1 after step 18 (rank 3 SIGKILLed, then node 1's keeper) and
    has no spare: relaunched as dp2 on the surviving node, it takes its state from that node's keeper — the 4-rank
    layout's blocks, resharded in memory, newer than storage — and trains on as the uninterrupted 4-rank run did."""
    config, ref, world_a = reference(reference_run, "pp2xdp2")
    root, kill = tmp_path / "run", "fault.inject=[kill:rank=3:step=18]"
    stored = copy_back(ref, root / "t", STEPS - 4)
    with pytest.raises(RuntimeError, match="died"):
        train_local(config, run_overrides(root, *COMMON, *AT_THE_END, kill, WAIT, "parallel.order=dp,pp,sp",
                                          "checkpoint.simulate_nodes=2"), world_a)
    sigkill(keeper_pid(root / "t", 1))
    train_local(config, run_overrides(root, *COMMON, *AT_THE_END, kill, "parallel.pp=1", "parallel.dp=2"), 2)
    restore = [e for e in events(root / "t") if e["event"] == "restore"][-1]
    assert restore["step"] >= 17 > stored, (restore, stored)  # at most the step in flight lost
    assert "ranks 0, 1 of the 4 ranks (the others' blocks of it are lost" in restore["reason"], restore
    assert_same_trajectory(root / "t", ref, restore["step"], tier="keeper (resharded)")
    # the 4-rank layout's memory is let go once the 2-rank layout has committed a step of its own
    run_id, _ = run_identity(str(root / "t"))
    assert not list(Path(node_dir(default_keeper_dir(), run_id, 0)).glob("*retired*"))
