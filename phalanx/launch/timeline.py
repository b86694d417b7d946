"""A run's failures and recoveries as a timeline, from `events.jsonl` (printed by `phalanx ray` at its end)."""

from __future__ import annotations

from typing import Any

from phalanx.events import read_events

SHOWN = ("workers", "fault_injected", "failure", "recovery", "resize", "straggler", "gave_up", "controller_done")


def _line(event: dict[str, Any]) -> str:
    kind = event["event"]
    if kind == "workers":
        return f"attempt {event['attempt']}: workers on nodes {event['nodes']}"
    if kind == "fault_injected":
        where = f"node {event['node']}" if event.get("kind") == "node" else f"rank {event.get('rank')}"
        nth = f" #{event['index']}" if "index" in event else ""  # the n-th fault of a random schedule
        return f"fault injected: {event['spec']}{nth} ({where}, step {event['step']})"
    if kind == "failure":
        if not event["ranks"]:  # not a failure: an elastic run's room to grow
            return f"{event['cause']}: {event.get('detail', '')}"
        return (f"failure detected: {event['cause']}, ranks {event['ranks']} on nodes {event['nodes']}"
                + (f" ({event['detail']})" if event.get("detail") else ""))
    if kind == "recovery":
        return (f"recovered from {event['cause']}: restored step {event['step']} from {event['restored_from']}, "
                f"steps lost {event['steps_lost']}; downtime {event['downtime_s']:.2f}s = detect "
                f"{event['detect_s']:.2f} + restart {event['restart_s']:.2f} + restore {event['restore_s']:.2f} "
                f"+ first step {event['first_step_s']:.2f}")
    if kind == "resize":
        return (f"resized ({event['cause']}): {event['from_workers']} workers ({event['from_layout']}) -> "
                f"{event['to_workers']} ({event['to_layout']}), from {event['restored_from']} at step {event['step']}, "
                f"replan {event['replan_s']:.2f}s")
    if kind == "straggler":
        return (f"straggler: rank {event['rank']} (node {event['node']}) busy {event['busy_s']:.3f}s per step "
                f"vs median {event['median_busy_s']:.3f}s")
    if kind == "gave_up":
        return f"gave up: {event['message']}"
    return f"finished after {event['restarts']} recoveries"


def timeline(run_dir: str, since: float) -> list[str]:
    """A header and one line per controller event at or after `since`, timed in seconds from `since`."""
    events = read_events(run_dir, since=since, kinds=set(SHOWN))
    return [f"phalanx ray: timeline of {run_dir} (seconds since launch)"] + [
        f"  {e['time'] - since:8.2f}  {_line(e)}" for e in events]
