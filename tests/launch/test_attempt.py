"""Where each rank of a new attempt runs, and the layout an elastic run goes on with (pure: no Ray)."""

from phalanx.launch.attempt import keep_nodes


def test_ranks_keep_their_nodes_and_the_lost_rank_takes_the_new_one():
    # rank 0's node "a" was lost; "d" replaced it; Ray listed the bundles in another order
    assert keep_nodes(["b", "d", "c"], ["a", "b", "c"]) == [1, 0, 2]
    assert keep_nodes(["d", "c", "b"], ["a", "b", "c"]) == [0, 2, 1]


def test_two_ranks_of_a_node_keep_it_and_a_first_attempt_takes_the_bundles_in_order():
    assert keep_nodes(["x", "a", "a", "y"], ["a", "a", "b", "c"]) == [1, 2, 0, 3]
    assert keep_nodes(["b", "a"], []) == [0, 1]


def test_an_elastic_run_goes_on_with_the_planners_layout_for_fewer_workers_keeping_back_end_and_batch():
    from phalanx.config import load_config
    from phalanx.launch.elastic import elastic_layout
    from tests.helpers import REPO, TINY

    cfg = load_config(str(REPO / "configs" / "tiny_pp.yaml"), TINY)  # pp2 x dp2, batch 8
    two = elastic_layout(cfg, 2, 2, "cpu")
    assert two.world == 2 and two.dp_backend == "ddp" and 8 % (two.dp * two.micro_batch_size) == 0, two
    zero = load_config(str(REPO / "configs" / "tiny_zero.yaml"), [*TINY, "train.batch_size=6"])
    assert elastic_layout(zero, 2, 1, "cpu").name() == "dp2 zero2 mb1"  # the stage kept, micro-batch 1 (6 = 2 x 3)
    assert elastic_layout(zero, 4, 1, "cpu").name() == "dp2xsp2 zero2 mb1"  # 6 do not split over dp4: sp takes 2
    assert elastic_layout(zero, 5, 1, "cpu") is None  # nor over 5 ranks in any way (4 heads, 2 blocks)
    zero.fault.elastic, zero.fault.elastic_layouts = True, ["dp2xsp2 zero2 mb1"]  # the user's pins: only those
    assert elastic_layout(zero, 2, 1, "cpu") is None and elastic_layout(zero, 4, 1, "cpu").name() == "dp2xsp2 zero2 mb1"
    big = load_config(str(REPO / "configs" / "tiny.yaml"), ["model.d_model=8192", "model.n_layers=80",
                                                             "model.n_heads=64", "model.n_kv_heads=8"])
    assert elastic_layout(big, 2, 1, "H100") is None  # 70B with AdamW on 2 x 80 GB: the planner says no fit


def test_elastic_bad_input_is_one_line_naming_the_fix(tmp_path):
    import pytest

    from phalanx.config import load_config
    from phalanx.errors import ConfigError
    from phalanx.launch.controller import main
    from phalanx.launch.elastic import no_layout_message
    from tests.helpers import CONFIG, TINY, run_overrides

    with pytest.raises(ConfigError, match=r"fault.min_workers=3 > --workers=2.*lower fault.min_workers"):
        main(CONFIG, run_overrides(tmp_path, "fault.elastic=true", "fault.min_workers=3"), 2, None)
    assert not (tmp_path / "t").exists()  # refused before any run folder or Ray
    with pytest.raises(ConfigError, match=r"fault.elastic_layouts=\['dp2 ddp mb1'\] is set but fault.elastic=false"):
        main(CONFIG, run_overrides(tmp_path, "fault.elastic_layouts=[dp2 ddp mb1]"), 2, None)
    message = no_layout_message(load_config(CONFIG, [*TINY, "train.batch_size=7"]), 2, 3)
    assert "train.batch_size=7" in message and "fault.min_workers" in message and "(e.g. 6)" in message, message
