"""The controller's judgement, without Ray: the rank that never entered a collective is named, not the
ones waiting in it; stragglers are judged by busy time against the other ranks; injections parse."""

from __future__ import annotations

import pytest

from phalanx.errors import ConfigError
from phalanx.faults import parse_injection
from phalanx.launch.watchdog import find_hang, find_stragglers


def beat(step, seq, inside=None, since=0.0, phase="forward_backward", recent=()):
    return {"step": step, "seq": seq, "phase": phase, "recent": list(recent),
            "in_collective": None if inside is None else {"seq": inside, "name": "all_reduce/dp", "since": since}}


def test_the_rank_that_never_entered_is_named():
    beats = {0: beat(4, 11, inside=11, since=100.0), 1: beat(4, 10), 2: beat(4, 11, inside=11, since=101.0),
             3: beat(4, 11, inside=11, since=100.5)}
    assert find_hang(beats, now=105.0, timeout_s=10.0) is None  # not yet past the timeout
    hang = find_hang(beats, now=111.0, timeout_s=10.0)
    assert hang["culprits"] == [1] and hang["waiting"] == [0, 3] and hang["seq"] == 11
    assert hang["where"][1] == {"step": 4, "phase": "forward_backward", "seq": 10}


def test_when_everyone_entered_the_ranks_not_waiting_in_it_are_named():
    beats = {0: beat(2, 5, inside=5, since=0.0), 1: beat(2, 6, phase="optimizer")}
    assert find_hang(beats, now=20.0, timeout_s=10.0)["culprits"] == [1]


def test_a_straggler_is_busy_while_the_others_wait():
    fast = [(s, 1.0, 0.75) for s in range(1, 6)]  # busy 0.25 s, waiting for the slow one
    slow = [(s, 1.0, 0.0) for s in range(1, 6)]  # busy the whole step
    beats = {0: beat(5, 0, recent=fast), 1: beat(5, 0, recent=slow), 2: beat(5, 0, recent=fast)}
    found = find_stragglers(beats, factor=2.0, steps=3)
    assert [s["rank"] for s in found] == [1] and found[0]["steps"] == [3, 4, 5]
    assert find_stragglers(beats, factor=5.0, steps=3) == []
    assert find_stragglers({0: beats[0], 1: beats[1]}, factor=2.0, steps=6) == []  # too few steps seen


@pytest.mark.parametrize("spec,words", [
    ("explode:rank=1:step=2", "unknown kind 'explode'"),
    ("kill:rank=1", "missing step"),
    ("kill:rank=x:step=2", "rank=x is not a number"),
    ("slow:rank=1:step=2:speed=3", "'speed=3' is not one of slow's fields"),
])
def test_bad_injections_are_refused_with_the_fix(spec, words):
    with pytest.raises(ConfigError, match=words):
        parse_injection(spec)


def test_injections_parse():
    assert parse_injection("slow:rank=1:step=3:factor=2.5").factor == 2.5
    assert parse_injection("node:node=2:step=7").node == 2
