"""Recovery accounting (pure): a failure's downtime split into detect / restart / restore / first step,
from the failure and the relaunched run's `restore` and `first_step` events."""

from __future__ import annotations

from typing import Any, Optional

from phalanx.launch.failures import Failure


def recovery_record(failure: Failure, last_step: int, events: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The `recovery` event's fields once `events` (those since the failure was detected) hold the
    relaunched run's first step; None while they do not. `last_step`: the newest step reached before."""
    restore = first = None
    for event in events:
        if event["event"] == "restore" and restore is None:
            restore = event
        if event["event"] == "first_step":
            first = event
    if first is None:
        return None
    restore_end = restore["time"] if restore else first["time"]
    restore_s = restore["seconds"] if restore else 0.0
    restored_step = restore["step"] if restore else 0
    return {
        "cause": failure.cause, "ranks": failure.ranks, "nodes": failure.nodes, "detail": failure.detail,
        "failed_at": failure.failed_at, "detected_at": failure.detected_at,
        "restored_from": restore["restored_from"] if restore else "none (fresh start)",
        "step": restored_step, "steps_lost": max(0, last_step - restored_step),
        "detect_s": failure.detected_at - failure.failed_at,
        "restart_s": max(0.0, restore_end - restore_s - failure.detected_at),
        "restore_s": restore_s, "first_step_s": first["time"] - restore_end,
        "downtime_s": first["time"] - failure.failed_at,
    }


def recovery_line(record: dict[str, Any]) -> str:
    """The controller's one line on a recovery."""
    return (f"phalanx ray: recovered from {record['cause']} (ranks {record['ranks']}) from {record['restored_from']} "
            f"at step {record['step']}: downtime {record['downtime_s']:.2f}s (detect {record['detect_s']:.2f} + "
            f"restart {record['restart_s']:.2f} + restore {record['restore_s']:.2f} + first step "
            f"{record['first_step_s']:.2f}), steps lost {record['steps_lost']}")
