"""Where each rank of a new attempt runs (pure: no Ray)."""

from phalanx.launch.attempt import keep_nodes


def test_ranks_keep_their_nodes_and_the_lost_rank_takes_the_new_one():
    # rank 0's node "a" was lost; "d" replaced it; Ray listed the bundles in another order
    assert keep_nodes(["b", "d", "c"], ["a", "b", "c"]) == [1, 0, 2]
    assert keep_nodes(["d", "c", "b"], ["a", "b", "c"]) == [0, 2, 1]


def test_two_ranks_of_a_node_keep_it_and_a_first_attempt_takes_the_bundles_in_order():
    assert keep_nodes(["x", "a", "a", "y"], ["a", "a", "b", "c"]) == [1, 2, 0, 3]
    assert keep_nodes(["b", "a"], []) == [0, 1]
