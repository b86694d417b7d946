"""Fault injection for tests and demos: kill, hang or slow a rank at a step; kill a rank while it restores
(a failure during recovery); lose a node (controller).

Each injection fires once per run: the victim records `fault_injected` in `events.jsonl` before it
acts, and a relaunch that replays the step skips it.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Optional

from phalanx.errors import ConfigError
from phalanx.events import read_events

KINDS = {"kill": ("rank", "step"), "hang": ("rank", "step"), "slow": ("rank", "step", "factor"),
         "node": ("node", "step"), "kill_restoring": ("rank", "step")}


@dataclass(frozen=True)
class Injection:
    kind: str
    step: int
    rank: Optional[int] = None
    node: Optional[int] = None
    factor: float = 1.0
    spec: str = ""


def parse_injection(spec: str) -> Injection:
    """"kill:rank=1:step=5" -> Injection; a malformed one is a ConfigError naming the fix."""
    kind, *fields = spec.split(":")
    if kind not in KINDS:
        raise ConfigError(f"fault.inject '{spec}': unknown kind '{kind}'; use one of {sorted(KINDS)}, "
                          f"e.g. kill:rank=1:step=5")
    values: dict[str, Any] = {}
    for field_ in fields:
        key, _, value = field_.partition("=")
        if key not in KINDS[kind] or not value:
            raise ConfigError(f"fault.inject '{spec}': '{field_}' is not one of {kind}'s fields "
                              f"{', '.join(f'{k}=...' for k in KINDS[kind])}")
        try:
            values[key] = float(value) if key == "factor" else int(value)
        except ValueError:
            raise ConfigError(f"fault.inject '{spec}': {key}={value} is not a number") from None
    missing = [k for k in KINDS[kind] if k not in values and k != "factor"]
    if missing:
        raise ConfigError(f"fault.inject '{spec}': missing {', '.join(missing)}; e.g. "
                          f"{kind}:{':'.join(f'{k}=1' for k in KINDS[kind])}")
    return Injection(kind, values["step"], values.get("rank"), values.get("node"), values.get("factor", 2.0), spec)


def fired(run_dir: str) -> set[str]:
    return {e.get("spec") for e in read_events(run_dir, kinds={"fault_injected"})}


class FaultInjector:
    """The trainer side: called after every step with the step's seconds."""

    def __init__(self, specs: list[str], rank: int, run_dir: str):
        self.rank, self.run_dir = rank, run_dir
        done = fired(run_dir)
        self.pending = [i for i in map(parse_injection, specs)
                        if i.kind != "node" and i.rank == rank and i.spec not in done]
        self.slow: Optional[Injection] = None
        self.last_seconds = self.slept = 0.0

    def before_step(self) -> None:
        """A slowed rank works `factor` times as long: the sleep is part of its step (its busy time)."""
        self.slept = 0.0
        if self.slow is not None and self.last_seconds:
            self.slept = (self.slow.factor - 1.0) * self.last_seconds
            time.sleep(self.slept)

    def restoring(self, step: int) -> None:
        """Called between fetching a restored state (of `step`) and loading it: `kill_restoring` fires on
        the first restore of step `step` or later, while the other ranks go on into the first step."""
        for injection in [i for i in self.pending if i.kind == "kill_restoring" and step >= i.step]:
            self._fire(injection, step)

    def after_step(self, step: int, seconds: float) -> None:
        self.last_seconds = seconds - self.slept  # the step's own work, without the injected sleep
        for injection in [i for i in self.pending if i.step == step and i.kind != "kill_restoring"]:
            self._fire(injection, step)

    def _fire(self, injection: Injection, step: int) -> None:
        self.pending.remove(injection)
        from phalanx.events import append_event

        append_event(self.run_dir, "fault_injected", spec=injection.spec, kind=injection.kind, rank=self.rank,
                     step=step)
        if injection.kind in ("kill", "kill_restoring"):
            os.kill(os.getpid(), signal.SIGKILL)
        elif injection.kind == "hang":
            from phalanx.telemetry import health

            if health.HEALTH.enabled:
                health.HEALTH.hang_at_next = True
            else:
                while True:  # no controller watches: block where we are
                    time.sleep(3600)
        elif injection.kind == "slow":
            self.slow = injection
