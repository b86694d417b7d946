"""Fault injection for tests and demos: kill, hang or slow a rank at a step; kill a rank while it restores
(a failure during recovery); lose a node (controller); or a random schedule of kills and node losses
(controller), Poisson in wall time from a seed, for measuring goodput against the planner's simulator.

Each injection fires once per run: the victim (the controller for node losses and random faults) records
`fault_injected` in `events.jsonl` before it acts, and a relaunch that replays the step skips it.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

from phalanx.errors import ConfigError
from phalanx.events import read_events

KINDS = {"kill": ("rank", "step"), "hang": ("rank", "step"), "slow": ("rank", "step", "factor"),
         "node": ("node", "step"), "kill_restoring": ("rank", "step")}
RANDOM = "random"
RANDOM_FIELDS = ("kill_per_min", "node_per_min", "seed")
RANDOM_EXAMPLE = "random:kill_per_min=2:node_per_min=1:seed=0"


@dataclass(frozen=True)
class Injection:
    kind: str
    step: int
    rank: Optional[int] = None
    node: Optional[int] = None
    factor: float = 1.0
    spec: str = ""


@dataclass(frozen=True)
class RandomFault:
    """The `index`-th fault of a random schedule: `at_s` seconds after its clock started, a "kill" (one rank) or a
    "node" loss; `draw` picks the victim among the ranks or nodes there are when it fires (`victim`)."""

    index: int
    at_s: float
    kind: str
    draw: int

    def victim(self, candidates: Sequence[int]) -> int:
        """The rank or node this fault strikes, of `candidates` (the same draw picks the same one of the same set)."""
        ordered = sorted(set(candidates))
        return ordered[self.draw % len(ordered)]


@dataclass(frozen=True)
class RandomFaults:
    """A random schedule: kills and node losses as two Poisson processes in wall time (rates per minute), their
    times and victims drawn from `seed`."""

    kill_per_min: float
    node_per_min: float
    seed: int
    spec: str

    def faults(self) -> Iterator[RandomFault]:
        """The schedule, endless and the same for the same seed: the merged process has the summed rate, and each
        fault is a kill or a node loss in proportion to its rate."""
        rng = random.Random(self.seed)
        total = self.kill_per_min + self.node_per_min
        at, index = 0.0, 0
        while True:
            at += rng.expovariate(total / 60.0)
            kind = "kill" if rng.random() * total < self.kill_per_min else "node"
            yield RandomFault(index, at, kind, rng.randrange(1 << 30))
            index += 1


class RandomClock:
    """Which faults of a random schedule are due. The clock starts when the run first trains (`start`): the
    schedule strikes training and recovery, not the launch. A relaunched run skips the `done` faults it fired."""

    def __init__(self, schedule: RandomFaults, done: int = 0):
        self.schedule = schedule
        self.started_at: Optional[float] = None
        self._faults = schedule.faults()
        self._next = next(self._faults)
        while self._next.index < done:
            self._next = next(self._faults)

    def start(self, now: float) -> None:
        if self.started_at is None:
            self.started_at = now

    def due(self, now: float) -> list[RandomFault]:
        """The faults whose time has come by `now` (wall-clock seconds), each once."""
        out: list[RandomFault] = []
        while self.started_at is not None and self._next.at_s <= now - self.started_at:
            out.append(self._next)
            self._next = next(self._faults)
        return out


def is_random(spec: str) -> bool:
    """A random schedule's spec ("random:...")."""
    return spec.split(":", 1)[0] == RANDOM


def parse_random(spec: str) -> RandomFaults:
    """"random:kill_per_min=2:node_per_min=1:seed=0" -> RandomFaults (a missing rate is 0, the seed 0)."""
    values = _fields(spec, spec.split(":")[1:], RANDOM_FIELDS, "the random schedule's", f"; e.g. {RANDOM_EXAMPLE}",
                     integer=("seed",))
    kill, node = values.get("kill_per_min", 0.0), values.get("node_per_min", 0.0)
    if min(kill, node) < 0 or kill + node <= 0 or not (kill + node) < float("inf"):
        raise ConfigError(f"fault.inject '{spec}': kill_per_min={kill} and node_per_min={node} must be >= 0 and "
                          f"not both 0 (faults per minute of wall time); e.g. {RANDOM_EXAMPLE}")
    return RandomFaults(kill, node, int(values.get("seed", 0)), spec)


def parse_faults(specs: Sequence[str]) -> tuple[list[Injection], Optional[RandomFaults]]:
    """fault.inject -> (the injections at steps, the random schedule or None); at most one random schedule."""
    fixed = [parse_injection(s) for s in specs if not is_random(s)]
    randoms = [parse_random(s) for s in specs if is_random(s)]
    if len(randoms) > 1:
        raise ConfigError(f"fault.inject has {len(randoms)} random schedules ({', '.join(r.spec for r in randoms)}); "
                          f"give one, with the rates summed, e.g. {RANDOM_EXAMPLE}")
    return fixed, (randoms[0] if randoms else None)


def _fields(spec: str, fields: Sequence[str], allowed: Sequence[str], owner: str, example: str,
            integer: Sequence[str]) -> dict[str, Any]:
    """"key=value" fields of `spec` -> {key: number} (ints for `integer` keys); a ConfigError naming the field."""
    values: dict[str, Any] = {}
    for field_ in fields:
        key, _, value = field_.partition("=")
        if key not in allowed or not value:
            raise ConfigError(f"fault.inject '{spec}': '{field_}' is not one of {owner} fields "
                              f"{', '.join(f'{k}=...' for k in allowed)}{example}")
        try:
            values[key] = int(value) if key in integer else float(value)
        except ValueError:
            raise ConfigError(f"fault.inject '{spec}': {key}={value} is not a number") from None
    return values


def parse_injection(spec: str) -> Injection:
    """"kill:rank=1:step=5" -> Injection; a malformed one is a ConfigError naming the fix."""
    kind, *fields = spec.split(":")
    if kind not in KINDS:
        raise ConfigError(f"fault.inject '{spec}': unknown kind '{kind}'; use one of {sorted(KINDS)} or {RANDOM}, "
                          f"e.g. kill:rank=1:step=5 or {RANDOM_EXAMPLE}")
    values = _fields(spec, fields, KINDS[kind], f"{kind}'s", "", integer=("rank", "step", "node"))
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
        self.pending = [i for i in parse_faults(specs)[0]
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
