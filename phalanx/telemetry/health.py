"""What a trainer tells its controller: step, phase, and where it is among the run's collectives.

Collectives are periodic and uniform (C4): every rank enters the same sequence of them. Each rank
counts the collectives it enters (`comm.py` and the DDP bucket hook call `enter`/`leave`), so when
a collective hangs, the ranks inside it wait at sequence number n while the faulty rank never
reached n — the controller names it. Time spent inside collectives is also summed per step: a
straggler is the rank whose *busy* time (step minus waiting) exceeds the others', since the others
wait for it. Plain module state, read by the controller's heartbeat calls from another thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Health:
    enabled: bool = False
    step: int = 0
    phase: str = "start"
    seq: int = 0  # collectives entered so far
    open: dict[int, tuple[str, float]] = field(default_factory=dict)  # seq -> (collective, entered at)
    wait_s: float = 0.0  # seconds inside collectives during the current step
    recent: list[tuple[int, float, float]] = field(default_factory=list)  # (step, step seconds, waiting)
    metrics: Optional[dict[str, Any]] = None  # the last logged metrics (rank 0 streams them)
    hang_at_next: bool = False  # fault injection: block before entering the next collective
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            oldest = min(self.open.items(), key=lambda kv: kv[1][1]) if self.open else None
            return {"time": time.time(), "step": self.step, "phase": self.phase, "seq": self.seq,
                    "in_collective": None if oldest is None else {"seq": oldest[0], "name": oldest[1][0],
                                                                 "since": oldest[1][1]},
                    "recent": list(self.recent[-8:]), "metrics": self.metrics}


HEALTH = Health()


def enter(name: str) -> int:
    """Before a collective; returns its sequence number for `leave`."""
    if not HEALTH.enabled:
        return 0
    if HEALTH.hang_at_next:  # injected: never enter (the controller names this rank, then kills it)
        while True:
            time.sleep(3600)
    with HEALTH.lock:
        HEALTH.seq += 1
        HEALTH.open[HEALTH.seq] = (name, time.time())
        return HEALTH.seq


def leave(seq: int) -> None:
    if not HEALTH.enabled:
        return
    with HEALTH.lock:
        entered = HEALTH.open.pop(seq, None)
        if entered is not None:
            HEALTH.wait_s += time.time() - entered[1]


def phase(name: str) -> None:
    if HEALTH.enabled:
        HEALTH.phase = name


def step_done(step: int, seconds: float) -> None:
    if not HEALTH.enabled:
        return
    with HEALTH.lock:
        HEALTH.step = step
        HEALTH.recent.append((step, seconds, HEALTH.wait_s))
        del HEALTH.recent[:-32]
        HEALTH.wait_s = 0.0
