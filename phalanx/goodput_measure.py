"""A run's effective training time (ETTR) measured from its `events.jsonl` and `metrics.jsonl`, and the recovery
terms the run shows, in the units of the planner's simulator (`phalanx/planner/goodput.py`).

ETTR = the wall time of the steps the run kept (the last record of every step, counted once at its own
`step_seconds`) over the wall time from launch to end. The rest of the wall time is split into the simulator's keys
by walking the run's marks in time order (one clock: every process of a run writes wall-clock times):

  startup   launch -> the first step (Ray placement, process start, imports, process groups, the first step's excess);
  snapshot  what a kept step's interval holds beyond its step_seconds (the snapshot launch and logging);
  persist   the same after a persist step, and the final save at the end;
  lost      steps trained and later rolled back (every record but a step's last), and the step a failure interrupted;
  detect    the fault (its `fault_injected` time, else the controller's failed_at) -> the failure's detection;
  restart   detection -> the restore's start, and the first step's excess over a steady step after it;
  restore   the restore's own seconds;
  shrunk    what a step on fewer workers than the run's most took beyond a full-size step (elastic);
  wait      never measured apart (a wait for a node is inside restart).
A fault during a recovery ends the segment it strikes (its time stays where it was) and starts detection again,
as the simulator does. Records must be per step (log.every=1) to place each step; coarser logging places a record's
steps together.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from phalanx.errors import PhalanxError
from phalanx.events import read_events, read_jsonl

KEYS = ("train", "snapshot", "persist", "detect", "restart", "restore", "wait", "lost", "shrunk", "startup")
ENDS = ("end", "controller_done", "gave_up")
# where the time of a state goes when a mark ends it
LABEL = {"startup": "startup", "training": "persist", "detect": "detect", "restart": "restart", "restore": "restore",
         "done": "persist"}


def _persist_every(run_dir: str) -> int:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return 0
    from omegaconf import OmegaConf

    return int(OmegaConf.select(OmegaConf.load(path), "checkpoint.persist_every", default=0) or 0)


def measured_ettr(run_dir: str) -> dict[str, Any]:
    """ETTR of the run in `run_dir` and its breakdown (`ettr_of`)."""
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    records = [r for r in records if type(r.get("step")) is int and isinstance(r.get("time"), (int, float))]
    if not records:
        raise PhalanxError(f"'{run_dir}' has no timed step records in metrics.jsonl (written by phalanx since steps "
                           f"carry a `time`); train the run again to measure its effective training time")
    return ettr_of(read_events(run_dir), records, _persist_every(run_dir))


def _fault_times(events: list[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
    """Each failure (grows included) with the instant it struck: the newest fault injected since the previous
    detection, else the controller's estimate (failed_at, the dead rank's last heartbeat)."""
    out, since = [], float("-inf")
    injected = [e["time"] for e in events if e["event"] == "fault_injected"]
    for failure in (e for e in events if e["event"] == "failure"):
        detected = failure.get("detected_at", failure["time"])
        faults = [t for t in injected if since < t <= detected]
        out.append((failure, max(faults) if faults and failure["ranks"] else min(failure.get("failed_at", detected),
                                                                                   detected)))
        since = detected
    return out


def _marks(events: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[tuple[float, int, str, Any]]:
    """(time, order, kind, payload), sorted: the order breaks ties the way the run went."""
    marks: list[tuple[float, int, str, Any]] = []
    for failure, struck in _fault_times(events):
        marks.append((struck, 0, "fault", failure))
        marks.append((failure.get("detected_at", failure["time"]), 1, "detected", failure))
    for e in events:
        if e["event"] == "restore":
            marks.append((e["time"] - float(e.get("seconds", 0.0)), 2, "restore_start", e))
            marks.append((e["time"], 3, "restore_end", e))
        elif e["event"] in ("start", "resume"):
            marks.append((e["time"], 4, "launch", e))
        elif e["event"] in ENDS:
            marks.append((e["time"], 6, "end", e))
    marks += [(r["time"], 5, "step", i) for i, r in enumerate(records)]
    return sorted(marks, key=lambda m: (m[0], m[1]))


def ettr_of(events: list[dict[str, Any]], records: list[dict[str, Any]], persist_every: int = 0) -> dict[str, Any]:
    """ETTR and where the wall time went (pure): `events` of events.jsonl, timed `records` of metrics.jsonl in file
    order. Returns ettr, wall_s, breakdown (fractions of wall_s over KEYS, summing to 1), seconds (the same in
    seconds), kept_steps, trained_steps (records, replays included), failures and faults, step_s (the mean steady
    step), the mean snapshot and persist overheads, end_s (the final save) and per-recovery facts (`recoveries`) for
    `run_terms`."""
    kept = {r["step"]: i for i, r in enumerate(records)}  # a step's last record is the one the run kept
    launches = [e for e in events if e["event"] in ("start", "resume")]
    full = max([int(e.get("world_size", 1)) for e in launches] or [1])
    starts = [e["time"] for e in events if e["event"] == "launch"] or [e["time"] for e in launches]
    begin = min(starts) if starts else records[0]["time"] - records[0]["step_seconds"]
    ends = [e["time"] for e in events if e["event"] in ENDS]
    finish = max([*ends, records[-1]["time"]])

    acc = dict.fromkeys(KEYS, 0.0)
    cursor, state, resume_state, world = begin, "startup", "startup", full
    opened = False  # a launch began: the next record is its first step
    end_s = 0.0  # the final save (and the controller's last words): after the last step, once per run
    rows: list[tuple[int, float, int, bool]] = []  # kept records: (index, interval, world, first of a launch)
    for t, _, kind, payload in _marks(events, records):
        if t < begin or t > finish:
            continue
        dt = max(0.0, t - cursor)
        if kind == "step":
            if kept[records[payload]["step"]] == payload:
                rows.append((payload, dt, world, opened or state != "training"))
            else:
                acc["lost"] += dt
            state, opened = "training", False
        elif kind == "fault":
            acc["lost" if state == "training" else LABEL[state]] += dt
            state = "detect" if payload["ranks"] else "restart"  # a grow is no fault: nothing to detect
        elif kind == "detected":
            acc[LABEL[state]] += dt
            state = "restart"
        elif kind == "restore_start":
            acc[LABEL[state]] += dt
            resume_state, state = (state if state in ("startup", "restart") else "restart"), "restore"
        elif kind == "restore_end":
            acc["restore"] += dt
            state = resume_state
        elif kind == "launch":
            acc[LABEL[state]] += dt
            world, opened = int(payload.get("world_size", full)), True
            if state == "training":
                state = "restart"  # a relaunch without a failure the controller saw (a resumed command)
        else:  # the run's end
            acc[LABEL[state]] += dt
            end_s += dt if state in ("training", "done") else 0.0
            state = "done"
        cursor = max(cursor, t)
    acc[LABEL[state]] += max(0.0, finish - cursor)
    end_s += max(0.0, finish - cursor) if state in ("training", "done") else 0.0

    # The steady step: the mean of kept full-size steps that did not open a launch (a mean: ETTR sums steps).
    pool = [records[i]["step_seconds"] for i, _, w, first in rows if w == full and not first]
    base = _mean(pool or [records[i]["step_seconds"] for i, _, _, _ in rows])
    snapshot_overheads, persist_overheads = [], []
    for n, (index, dt, w, first) in enumerate(rows):
        own = min(float(records[index]["step_seconds"]), dt)
        where = "startup" if n == 0 else "restart"  # the excess of a launch's first step
        if w < full or first:
            acc["train"] += min(own, base)
            acc["shrunk" if w < full else where] += own - min(own, base)
        else:
            acc["train"] += own
        rest = dt - own
        step_before = records[index]["step"] - 1
        if first:
            acc[where] += rest
        elif persist_every and step_before > 0 and step_before % persist_every == 0:
            acc["persist"] += rest
            persist_overheads.append(rest)
        else:
            acc["snapshot"] += rest
            snapshot_overheads.append(rest)
    wall = finish - begin
    recoveries = _recoveries(events, base)
    total = sum(acc.values())
    breakdown = {k: (v / total if total > 0 else 0.0) for k, v in acc.items()}
    return {
        "ettr": breakdown["train"], "wall_s": wall, "breakdown": breakdown, "seconds": acc,
        "kept_steps": len(kept), "trained_steps": len(records),
        "failures": sum(1 for e in events if e["event"] == "failure" and e["ranks"]),
        "faults": sum(1 for e in events if e["event"] == "fault_injected"),
        "step_s": base, "snapshot_s": _mean(snapshot_overheads), "persist_s": _mean(persist_overheads),
        "recoveries": recoveries, "end_s": end_s,
    }


def _recoveries(events: list[dict[str, Any]], base: float) -> list[dict[str, Any]]:
    """One row per recovery the controller recorded: its cause and tier, and its phases with detection from the
    injected fault's own instant and the first step's excess over a steady step; `since_s`: how long the attempt
    it struck had trained (from its first step), which decides here whether a warm spare was ready; `struck`: the
    faults injected while it ran (absorbed into it, so its phases are not one recovery's)."""
    struck = {id(f): t for f, t in _fault_times(events)}
    failures = {f.get("detected_at"): f for f in events if f["event"] == "failure"}
    firsts = [e["time"] for e in events if e["event"] == "first_step"]
    injected = [e["time"] for e in events if e["event"] == "fault_injected"]
    rows = []
    for e in (e for e in events if e["event"] == "recovery"):
        failure = failures.get(e.get("detected_at"))
        at = struck.get(id(failure), e["failed_at"]) if failure is not None else e["failed_at"]
        since = at - max([t for t in firsts if t <= at] or [at])
        rows.append({"cause": e["cause"], "restored_from": e["restored_from"], "steps_lost": e["steps_lost"],
                     "since_s": since, "struck": sum(e["detected_at"] < t <= e["time"] for t in injected),
                     "detect_s": max(0.0, e["detected_at"] - at), "restart_s": e["restart_s"],
                     "restore_s": e["restore_s"], "first_step_s": max(0.0, e["first_step_s"] - base)})
    return rows


def ettr_line(measured: dict[str, Any]) -> str:
    """"effective training time 87.3% (snapshot 2.1%, ...)": the measured ETTR and every other share above 0.05%."""
    rest = ", ".join(f"{k} {v * 100:.1f}%" for k, v in measured["breakdown"].items() if k != "train" and v >= 5e-4)
    return (f"effective training time {measured['ettr'] * 100:.1f}% ({rest}; {measured['kept_steps']} steps kept of "
            f"{measured['trained_steps']} trained, {measured['failures']} failures, {measured['wall_s']:.0f}s)")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _mean_or_none(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def run_terms(measured: dict[str, Any]) -> dict[str, Optional[float]]:
    """The recovery terms a measured run shows (`measured_ettr`), named as the simulator's `RecoveryTerms` fields,
    each a mean over the run's recoveries of that kind that no other fault struck (None where it had none), and
    beside them what a run pays once: `startup_s` (launch to the first step) and `end_s` (the final save). Restarts
    differ by path (a lost node's ranks all start again; a storage restore looks in memory first), so they come per
    path too: `restart_process_s` (a killed rank), `restart_node_s` (a lost node rebuilt from peers),
    `restart_storage_s`."""
    rows = [r for r in measured["recoveries"] if not r.get("struck")]  # each one recovery, no fault absorbed
    of = lambda key, **match: _mean_or_none([r[key] for r in rows  # noqa: E731
                                             if all(r[k] == v for k, v in match.items())])
    return {
        "step_s": measured["step_s"], "snapshot_s": measured["snapshot_s"], "persist_s": measured["persist_s"],
        "detect_process_s": of("detect_s", cause="dead worker"),
        "detect_node_s": of("detect_s", cause="lost node"),
        "restart_s": of("restart_s"),
        "restart_process_s": of("restart_s", cause="dead worker"),
        "restart_node_s": of("restart_s", cause="lost node", restored_from="peers"),
        "restart_storage_s": of("restart_s", restored_from="storage"),
        "restore_keeper_s": of("restore_s", restored_from="keeper"),
        "restore_peer_s": of("restore_s", restored_from="peers"),
        "restore_storage_s": of("restore_s", restored_from="storage"),
        "first_step_s": of("first_step_s"),
        "steps_lost": of("steps_lost"),
        "startup_s": measured["seconds"]["startup"], "end_s": measured["end_s"],
    }
