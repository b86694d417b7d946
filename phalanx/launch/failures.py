"""The controller's judgement of a failed attempt from what its workers reported (pure functions, no Ray).

The controller gathers facts into `Reports` — how a rank's run ended, the heartbeats, which Ray nodes
and keepers are alive — and `classify_failure` names the failure. Some facts cost a wait to gather
(fresh heartbeats, the other ranks' ends), so `next_question` says which one the judgement still needs
and the controller asks only that. The kinds:

- **dead worker**: a rank's actor died (its process was killed or crashed);
- **lost node**: a dead rank's node left the cluster, an injected node loss killed its keeper and
  workers, or the node's keeper actor stopped answering; every rank of the node is named;
- **hang**: a collective older than fault.collective_timeout_s; the ranks that never entered it are
  named (`watchdog.find_hang`), also when a rank's own collective timeout says so before a heartbeat does;
- **worker error**: a trainer raised, and no hang or dead peer explains it: its error line;
- **worker exit**: a rank's run returned a non-zero exit code.

A straggler is no failure: it is reported (`watchdog.find_stragglers`) and the run goes on. Every
failure is recovered from until fault.max_restarts.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from phalanx.launch.watchdog import find_hang

# A traceback's "what went wrong" line; torch appends `At:` frames after it.
_ERROR_LINE = re.compile(r"[\w.]*(Error|Exception)\b.*:")
# gloo says "Timed out waiting ..." in the op that timed out, and "Application timeout caused pair
# closure" in the ops that shared its connection.
_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)


class Failure(Exception):
    """A failed attempt: its cause (one of the kinds above), the ranks and nodes to blame, when it failed
    and when it was detected (wall-clock seconds)."""

    def __init__(self, cause: str, ranks: list[int], nodes: list[int], failed_at: float, detail: str = "",
                 detected_at: Optional[float] = None):
        super().__init__(f"{cause}: rank(s) {ranks} on node(s) {nodes}" + (f" — {detail}" if detail else ""))
        self.cause, self.ranks, self.nodes, self.failed_at, self.detail = cause, ranks, nodes, failed_at, detail
        self.detected_at = time.time() if detected_at is None else detected_at


@dataclass(frozen=True)
class RankEnd:
    """How one rank's run ended: its exit code (with the message of a user error), the text of the error
    its trainer raised, or its actor died."""

    rank: int
    code: Optional[int] = None
    error: Optional[str] = None
    died: bool = False
    message: str = ""


@dataclass(frozen=True)
class Reports:
    """What the controller knows of an attempt. None: not asked (yet)."""

    nodes: list[int]  # node index of each rank
    node_ids: list[str]  # Ray node of each rank
    last_seen: dict[int, float]  # time of each rank's newest heartbeat (its start before the first)
    timeout_s: float  # fault.collective_timeout_s
    now: float  # when the heartbeats are judged
    beats: dict[int, dict[str, Any]] = field(default_factory=dict)  # newest heartbeat of each running rank
    ended: Optional[RankEnd] = None  # the rank whose run just ended
    running: Optional[list[int]] = None  # with `fresh`: ranks whose runs had not ended then
    fresh: Optional[dict[int, dict[str, Any]]] = None  # `beats`, updated by those asked again after a timeout error
    dead: Optional[list[int]] = None  # other ranks whose actors died, after a short wait for their ends
    alive_nodes: Optional[set[str]] = None  # Ray nodes in the cluster
    lost_nodes: frozenset[int] = frozenset()  # nodes an injected node loss killed
    keeper_gone: Optional[int] = None  # a node whose keeper actor stopped answering
    detected_at: Optional[float] = None  # when the facts were all in (None: `now`)


def error_line(err: Union[BaseException, str]) -> str:
    """The line of a worker's traceback that says what went wrong (the last `...Error: ...` line), at most
    300 characters."""
    text = err if isinstance(err, str) else (str(err).strip() or repr(err))
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    said = [line for line in lines if _ERROR_LINE.match(line)]
    return (said or lines or [text])[-1][:300]


def next_question(reports: Reports) -> Optional[str]:
    """The fact `classify_failure` still needs: "fresh_beats" (with "running"), "dead", "alive_nodes" — or None."""
    end = reports.ended
    if end is not None and end.error is not None:
        if (reports.fresh is None and _TIMEOUT.search(end.error)
                and find_hang(reports.beats, reports.now, reports.timeout_s) is None):
            return "fresh_beats"
        if reports.dead is None and error_hang(reports) is None:
            return "dead"
    if reports.alive_nodes is None and ((end is not None and end.died) or reports.dead):
        return "alive_nodes"
    return None


def classify_failure(reports: Reports) -> Optional[Failure]:
    """The failure `reports` show (None: the ended rank finished well, or nothing failed). An ended rank
    is judged first, then a gone keeper, then the heartbeats."""
    end = reports.ended
    if end is not None:
        return _judge_end(reports, end)
    if reports.keeper_gone is not None:
        ranks = [r for r, n in enumerate(reports.nodes) if n == reports.keeper_gone]
        return Failure("lost node", ranks, [reports.keeper_gone], max(reports.last_seen[r] for r in ranks),
                       "its keeper is gone", _detected(reports))
    hang = find_hang(reports.beats, reports.now, reports.timeout_s)
    return hang_failure(hang, reports) if hang else None


def _judge_end(reports: Reports, end: RankEnd) -> Optional[Failure]:
    rank, nodes = end.rank, reports.nodes
    if end.died:
        return dead_failure([rank], reports)
    if end.error is not None:  # a peer's death or hang reaching this rank, or an error of its own
        hang = error_hang(reports)
        if hang:
            return hang_failure(hang, reports)
        if reports.dead:
            return dead_failure(reports.dead, reports)
        return Failure("worker error", [rank], [nodes[rank]], reports.last_seen[rank], error_line(end.error),
                       _detected(reports))
    if end.code != 0:
        said = f": {error_line(end.message)}" if end.message else ""
        return Failure("worker exit", [rank], [nodes[rank]], reports.last_seen[rank], f"exit code {end.code}{said}",
                       _detected(reports))
    return None


def error_hang(reports: Reports) -> Optional[dict[str, Any]]:
    """The hang behind the ended rank's error: one the heartbeats show, or one its own collective timed
    out in (`timed_out_hang`)."""
    hang = find_hang(reports.beats, reports.now, reports.timeout_s)
    if hang is None and reports.fresh is not None and reports.running is not None:
        hang = timed_out_hang(reports.ended.rank, reports.beats, reports.fresh, reports.running)
    return hang


def timed_out_hang(rank: int, beats: dict[int, dict[str, Any]], fresh: dict[int, dict[str, Any]],
                   running: list[int]) -> Optional[dict[str, Any]]:
    """A hang that `rank`'s own collective timeout reported before a heartbeat showed it waiting (the
    process group's timeout is fault.collective_timeout_s too; under load it wins the race): the ranks
    still `running` that entered fewer collectives than `rank` (`fresh` heartbeats) never entered the
    one it timed out in. A rank that failed itself is no culprit."""
    if rank not in fresh:
        return None
    seq = fresh[rank]["seq"]
    culprits = sorted(r for r in running if r in fresh and fresh[r]["seq"] < seq)
    if not culprits:
        return None
    name = (beats.get(rank, {}).get("in_collective") or {}).get("name", "a collective")
    return {"collective": name, "seq": seq, "waiting": [rank], "culprits": culprits,
            "where": {r: {"step": fresh[r]["step"], "phase": fresh[r]["phase"], "seq": fresh[r]["seq"]}
                      for r in culprits}}


def hang_failure(hang: dict[str, Any], reports: Reports) -> Failure:
    """The failure of a hang (`find_hang`'s form): its culprits, which entered it at the latest a timeout ago."""
    where = "; ".join(f"rank {r} at step {w['step']} in {w['phase']} after collective #{w['seq']}"
                      for r, w in hang["where"].items())
    detail = (f"ranks {hang['waiting']} waited in {hang['collective']} #{hang['seq']} longer than "
              f"fault.collective_timeout_s={reports.timeout_s:.0f}s; never entered it: {where}")
    detected = _detected(reports)
    return Failure("hang", hang["culprits"], sorted({reports.nodes[r] for r in hang["culprits"]}),
                   detected - reports.timeout_s, detail, detected)


def dead_failure(dead: list[int], reports: Reports) -> Failure:
    """Dead workers, or — when a dead rank's node is gone from the cluster or was killed — a lost node
    with all its ranks."""
    nodes, killed = reports.nodes, reports.lost_nodes
    alive = set(reports.node_ids) if reports.alive_nodes is None else reports.alive_nodes  # not asked: all up
    lost = sorted({nodes[r] for r in dead if reports.node_ids[r] not in alive or nodes[r] in killed})
    if lost:
        ranks = [r for r, n in enumerate(nodes) if n in lost]
        why = "its keeper and workers were killed" if set(lost) <= killed else "the node left the cluster"
        return Failure("lost node", ranks, lost, min(reports.last_seen[r] for r in ranks), why, _detected(reports))
    return Failure("dead worker", dead, sorted({nodes[r] for r in dead}), min(reports.last_seen[r] for r in dead),
                   detected_at=_detected(reports))


def _detected(reports: Reports) -> float:
    return reports.now if reports.detected_at is None else reports.detected_at
