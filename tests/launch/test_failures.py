"""The controller's failure classification, without Ray or processes: one case per kind it tells apart,
and the facts it asks for before judging."""

from __future__ import annotations

from dataclasses import replace

from phalanx.launch.failures import Failure, RankEnd, Reports, classify_failure, error_line, next_question
from phalanx.launch.recovery import recovery_line, recovery_record
from phalanx.launch.watchdog import find_stragglers

NODES = [0, 0, 1, 1]  # ranks 0, 1 on node 0 (Ray node "a"); ranks 2, 3 on node 1 ("b")
IDS = ["a", "a", "b", "b"]
SEEN = {0: 50.0, 1: 51.0, 2: 52.0, 3: 53.0}


def beat(step, seq, inside=None, since=0.0, recent=()):
    return {"step": step, "seq": seq, "phase": "forward_backward", "recent": list(recent),
            "in_collective": None if inside is None else {"seq": inside, "name": "all_reduce/dp", "since": since}}


def reports(**facts) -> Reports:
    return Reports(**{"nodes": NODES, "node_ids": IDS, "last_seen": SEEN, "timeout_s": 10.0, "now": 100.0, **facts})


def judged(r: Reports, answers: dict) -> Failure:
    """What the controller's loop does: answer each question from `answers`, then classify."""
    asked = []
    while (question := next_question(r)) is not None:
        asked.append(question)
        r = replace(r, **answers[question])
    failure = classify_failure(replace(r, detected_at=101.0))
    failure.asked = asked
    return failure


def test_a_dead_worker_is_named_with_its_node():
    failure = judged(reports(ended=RankEnd(1, died=True)), {"alive_nodes": {"alive_nodes": {"a", "b"}}})
    assert failure.asked == ["alive_nodes"]
    assert (failure.cause, failure.ranks, failure.nodes) == ("dead worker", [1], [0])
    assert failure.failed_at == 51.0 and failure.detected_at == 101.0  # its last heartbeat; when judged


def test_a_dead_worker_whose_node_left_the_cluster_is_a_lost_node_with_all_its_ranks():
    failure = judged(reports(ended=RankEnd(2, died=True)), {"alive_nodes": {"alive_nodes": {"a"}}})
    assert (failure.cause, failure.ranks, failure.nodes) == ("lost node", [2, 3], [1])
    assert failure.detail == "the node left the cluster" and failure.failed_at == 52.0  # the first rank seen last


def test_an_injected_node_loss_is_a_lost_node_killed():
    r = reports(ended=RankEnd(3, died=True), lost_nodes=frozenset({1}))
    failure = judged(r, {"alive_nodes": {"alive_nodes": {"a", "b"}}})  # Ray still lists the node
    assert (failure.cause, failure.ranks, failure.detail) == ("lost node", [2, 3], "its keeper and workers were killed")


def test_a_gone_keeper_is_a_lost_node():
    failure = classify_failure(reports(keeper_gone=0))
    assert (failure.cause, failure.ranks, failure.nodes) == ("lost node", [0, 1], [0])
    assert failure.detail == "its keeper is gone" and failure.failed_at == 51.0  # the newest sign of life


def test_a_hang_names_the_rank_that_never_entered_the_collective():
    beats = {0: beat(4, 11, inside=11, since=85.0), 1: beat(4, 10), 2: beat(4, 11, inside=11, since=86.0),
             3: beat(4, 11, inside=11, since=85.5)}
    assert classify_failure(reports(beats=beats, now=94.0)) is None  # waiting, not yet past the timeout
    failure = classify_failure(reports(beats=beats))
    assert (failure.cause, failure.ranks, failure.nodes) == ("hang", [1], [0])
    assert failure.failed_at == 90.0  # it entered at the latest a timeout before the detection
    assert "ranks [0, 2, 3] waited in all_reduce/dp #11 longer than fault.collective_timeout_s=10s" in failure.detail
    assert "rank 1 at step 4 in forward_backward after collective #10" in failure.detail


def test_a_rank_whose_own_collective_timed_out_first_names_the_rank_behind():
    error = "RuntimeError: [gloo] Timed out waiting 10000ms for recv operation to complete"
    r = reports(ended=RankEnd(0, error=error), beats={0: beat(4, 11), 1: beat(4, 11), 2: beat(4, 11), 3: beat(4, 11)})
    fresh = {0: beat(4, 11), 1: beat(4, 11), 2: beat(4, 9), 3: beat(4, 11)}
    failure = judged(r, {"fresh_beats": {"fresh": fresh, "running": [1, 2, 3]}})
    assert failure.asked == ["fresh_beats"]  # the hang explains the error: the peers' ends are not waited for
    assert (failure.cause, failure.ranks, failure.nodes) == ("hang", [2], [1])
    assert "ranks [0] waited in a collective #11" in failure.detail


def test_an_error_caused_by_a_peers_death_blames_the_dead_peer():
    r = reports(ended=RankEnd(0, error="RuntimeError: Connection closed by peer [127.0.0.1]:1234"))
    failure = judged(r, {"dead": {"dead": [3]}, "alive_nodes": {"alive_nodes": {"a", "b"}}})
    assert failure.asked == ["dead", "alive_nodes"]  # no timeout in the text: no heartbeats asked
    assert (failure.cause, failure.ranks, failure.nodes) == ("dead worker", [3], [1])


def test_a_worker_error_of_its_own_is_its_error_line():
    traceback = ("Traceback (most recent call last):\n  File \"trainer.py\", line 12, in fit\n"
                 "ValueError: loss is nan at step 7\n\nAt:\n  comm.py(96): done")
    failure = judged(reports(ended=RankEnd(2, error=traceback)), {"dead": {"dead": []}})
    assert failure.asked == ["dead"]
    assert (failure.cause, failure.ranks, failure.nodes) == ("worker error", [2], [1])
    assert failure.detail == "ValueError: loss is nan at step 7" and failure.failed_at == 52.0


def test_a_non_zero_exit_is_a_worker_exit():
    # a user error in a worker (PhalanxError: one printed line, its exit code) ends this way too, and the
    # failure says what the rank printed
    failure = judged(reports(ended=RankEnd(1, code=2, message="keeper 127.0.0.1:5 refused 'fetch': no block")), {})
    assert failure.asked == []
    assert (failure.cause, failure.ranks, failure.nodes) == ("worker exit", [1], [0])
    assert str(failure) == ("worker exit: rank(s) [1] on node(s) [0] — exit code 2: "
                            "keeper 127.0.0.1:5 refused 'fetch': no block")


def test_a_rank_that_finished_well_is_no_failure():
    assert next_question(reports(ended=RankEnd(0, code=0))) is None
    assert classify_failure(reports(ended=RankEnd(0, code=0))) is None
    assert classify_failure(reports(beats={0: beat(3, 9), 1: beat(3, 9)})) is None


def test_a_straggler_is_reported_not_failed():
    fast = [(s, 1.0, 0.75) for s in range(1, 6)]
    slow = [(s, 1.0, 0.0) for s in range(1, 6)]
    beats = {0: beat(5, 20, recent=fast), 1: beat(5, 20, recent=slow), 2: beat(5, 20, recent=fast),
             3: beat(5, 20, recent=fast)}
    assert classify_failure(reports(beats=beats)) is None
    assert [s["rank"] for s in find_stragglers(beats, factor=2.0, steps=3)] == [1]


def test_error_lines():
    ddp = ("Traceback (most recent call last):\n  File \"trainer.py\", line 221, in forward_backward\n"
           "RuntimeError: Got the following error when running the callback: RuntimeError: Application "
           "timeout caused pair closure\n\nAt:\n  default_hooks.py(31): <lambda>")
    assert error_line(ddp).endswith("Application timeout caused pair closure")
    # an exception's text, with torch's `At:` frames after the error line more than once
    frames = RuntimeError(ddp + "\n\n\nAt:\n  comm.py(96): done")
    assert error_line(frames).endswith("Application timeout caused pair closure")
    assert error_line(ValueError("plain message")) == "plain message"
    assert error_line(RuntimeError()) == "RuntimeError()"
    assert len(error_line("x" * 1000)) == 300


def test_the_recovery_is_split_into_detect_restart_restore_first_step():
    failure = Failure("dead worker", [1], [0], failed_at=100.0, detected_at=101.0)
    restore = {"event": "restore", "time": 110.0, "seconds": 2.0, "step": 40, "restored_from": "keeper"}
    assert recovery_record(failure, 45, [restore]) is None  # not until the first step is done
    record = recovery_record(failure, 45, [restore, {"event": "first_step", "time": 111.5}])
    assert record["detect_s"] == 1.0 and record["restart_s"] == 7.0 and record["restore_s"] == 2.0
    assert record["first_step_s"] == 1.5 and record["downtime_s"] == 11.5 and record["steps_lost"] == 5
    assert recovery_line(record).startswith("phalanx ray: recovered from dead worker (ranks [1]) from keeper at step 40")
    fresh = recovery_record(failure, 3, [{"event": "first_step", "time": 105.0}])
    assert fresh["restored_from"] == "none (fresh start)" and fresh["restart_s"] == 4.0 and fresh["steps_lost"] == 3
