"""The restore decision, case by case, without processes: every tier the end-to-end recovery tests reach
(own keeper, a peer's copy, an erasure decode, more than m lost, storage newer than memory, a torn newest
checkpoint, nothing at all) from the keepers' inventories alone; and which blocks of another layout a launch can
reshard, read into any template (reshard.py)."""

from __future__ import annotations

from phalanx.checkpoint.restore_plan import plan_restore


def keeper(node: int, data: dict[int, list[int]], parity: tuple[dict, ...] = ()) -> dict:
    return {"node": node, "data": {rank: {step: i for i, step in enumerate(steps)} for rank, steps in data.items()},
            "parity": list(parity)}


def parity(step: int, members: list[int], j: int = 0, gid: int = 0) -> dict:
    return {"gid": gid, "j": j, "step": step, "members": members, "length": 64, "fp": "f"}


def test_every_rank_from_its_own_keeper_when_memory_is_at_least_as_new_as_storage():
    plan = plan_restore([keeper(0, {0: [5, 6]}), keeper(1, {1: [5, 6]})], nodes=[0, 1], k=None, stored=6)
    assert (plan.step, plan.tier, plan.tiers) == (6, "keeper", ["keeper", "keeper"])
    assert plan.sources == {0: ("data", 0), 1: ("data", 1)}
    assert "storage's newest is step 6" in plan.reason


def test_a_block_held_by_another_nodes_keeper_is_a_peer_copy():
    plan = plan_restore([keeper(0, {0: [4], 1: [4]}), keeper(1, {})], nodes=[0, 1], k=None, stored=None)
    assert (plan.step, plan.tier, plan.tiers) == (4, "peers", ["keeper", "peers"])
    assert plan.sources[1] == ("data", 0)


def test_a_lost_nodes_block_is_decoded_from_its_group():
    """k=2, m=1: ranks 0 and 1 on nodes 0 and 1, parity on node 2; node 1 is gone."""
    plan = plan_restore([keeper(0, {0: [7, 8]}), keeper(2, {}, (parity(7, [0, 1]), parity(8, [0, 1])))],
                        nodes=[0, 1], k=2, stored=5)
    assert (plan.step, plan.tier) == (8, "peers")
    assert plan.tiers == ["keeper", "peers (erasure decode)"] and plan.sources[1] == ("decode", None)


def test_more_lost_than_parity_falls_back_to_an_older_complete_step_then_to_storage():
    # Step 8: rank 1 lost and no parity of 8; step 7 complete for both ranks: memory step 7.
    inventories = [keeper(0, {0: [7, 8]}), keeper(1, {1: [7]})]
    assert plan_restore(inventories, nodes=[0, 1], k=2, stored=5).step == 7
    # Both data blocks of the group gone, only its one parity (m=1 < 2 lost): storage, with what was held.
    plan = plan_restore([keeper(2, {}, (parity(8, [0, 1]),))], nodes=[0, 1], k=2, stored=5)
    assert (plan.step, plan.tier, plan.tiers) == (5, "storage", ["storage", "storage"])
    assert "no step newer than 5" in plan.reason and "rank 0: none; rank 1: none" in plan.reason


def test_storage_newer_than_memory_wins():
    plan = plan_restore([keeper(0, {0: [3]})], nodes=[0], k=None, stored=10)
    assert (plan.step, plan.tier) == (10, "storage") and "newer than memory step 3" in plan.reason


def test_a_torn_newest_checkpoint_leaves_the_older_verified_one_or_memory():
    """The store reports the newest *verified* step (a torn or refused newer one is skipped there): the plan
    takes memory when it is newer than that, storage's verified step otherwise."""
    assert plan_restore([keeper(0, {0: [9]})], nodes=[0], k=None, stored=4).tier == "keeper"
    assert plan_restore([keeper(0, {})], nodes=[0], k=None, stored=4).step == 4


def test_nothing_anywhere_is_a_fresh_start():
    plan = plan_restore([keeper(0, {}), keeper(1, {1: [2]})], nodes=[0, 1], k=2, stored=None)
    assert (plan.step, plan.tier) == (None, "none") and "rank 1: steps 2" in plan.reason


def test_a_short_group_decodes_with_its_virtual_zero_members():
    """A group of one real member (k=2): the missing member counts as a known zero block."""
    plan = plan_restore([keeper(1, {}, (parity(3, [0]),))], nodes=[0], k=2, stored=None)
    assert (plan.step, plan.tiers) == (3, ["peers (erasure decode)"])


# ---- another layout's blocks (reshard.py) ------------------------------------------------------


def test_other_layouts_are_offered_newest_first_and_this_launchs_own_never():
    from phalanx.checkpoint.restore import other_layouts_in_memory

    def entry(fp: str, steps: list[int], world: int = 2) -> dict:
        return {"fp": fp, "world": world, "parallel": f"layout {fp}", "steps": [[s, i] for i, s in enumerate(steps)]}

    node0 = {"node": 0, "data": {"0": entry("new", [])}, "parity": [], "retired": [{"rank": 0, **entry("old", [7, 8])}]}
    node1 = {"node": 1, "data": {"1": entry("old", [7])}, "parity": [], "retired": []}
    offered = other_layouts_in_memory([node0, node1, None], mine="new")
    assert [(o.step, o.holders, o.world, o.parallel) for o in offered] == [
        (8, {0: 0}, 2, "layout old"), (7, {0: 0, 1: 1}, 2, "layout old")]


def test_another_layouts_lost_rank_is_decodable_from_its_group_survivors_and_parity():
    from phalanx.checkpoint.restore import OtherLayout

    def parity(gid: int, members: list[int], j: int = 0, k: int = 2, m: int = 1) -> tuple[int, dict]:
        return (9, {"gid": gid, "j": j, "step": 4, "members": members, "length": 16, "fp": "old", "k": k, "m": m})

    # ranks 0 and 2 on the lost node: 2's group {3, 2} has its parity and member 3; 0's group {0, 1} has no parity
    other = OtherLayout("old", 4, {1: 0, 3: 1}, 4, "dp4", (parity(1, [3, 2]),))
    assert list(other.decodable()) == [2]
    # a group that lost both members with one parity block is not; a short group's virtual member counts
    assert OtherLayout("old", 4, {0: 0}, 3, "dp3", (parity(0, [1, 2]),)).decodable() == {}
    assert list(OtherLayout("old", 4, {0: 0, 1: 0}, 3, "dp3", (parity(1, [2]),)).decodable()) == [2]
    # parity an older keeper wrote without its code (k, m) cannot be decoded
    assert OtherLayout("old", 4, {1: 0, 3: 1}, 4, "dp4", (parity(1, [3, 2], k=0),)).decodable() == {}


def test_blocks_of_another_layout_fill_any_template_and_a_lost_shard_is_named():
    """Two old ranks each hold half the rows of `w` (a sharded weight) and all of `b` (replicated); a one-rank
    template is filled from both, takes the non-tensor values from the first, and leaves out per-rank state.
    With one block lost, the half of `w` it held is named."""
    import torch

    from phalanx.checkpoint.flat import FlatLayout, LeafMeta
    from phalanx.checkpoint.reshard import coverage_problem, memory_metadata, reshard

    full = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    layouts, blocks = {}, {}
    for rank in (0, 1):
        rows = full[3 * rank: 3 * rank + 3]
        layout = FlatLayout([LeafMeta("w", "float32", [3, 4], 0, 48, [6, 4], [3 * rank, 0]),
                             LeafMeta("b", "float32", [4], 64, 16, [4], [0])], 1024)
        blocks[rank] = torch.zeros(layout.nbytes, dtype=torch.uint8)
        layout.pack(blocks[rank], {"w": rows, "b": torch.ones(4), "step": 7, "rng": {"seed": rank}})
        layouts[rank] = layout
    template = {"w": torch.zeros(6, 4), "b": torch.zeros(4), "step": 0, "rng": {"seed": 99}}
    state, read = reshard(template, layouts, blocks.__getitem__, ("rng",))
    assert torch.equal(state["w"], full) and torch.equal(state["b"], torch.ones(4)) and state["step"] == 7
    assert "rng" not in state and read == [0, 1]
    assert coverage_problem(template, memory_metadata(layouts)[0], ("rng",)) is None
    assert coverage_problem(template, memory_metadata({1: layouts[1]})[0], ("rng",)) == \
        "the keepers hold 12 of the 24 elements of w"
