"""Hooks: the training loop's optional work, each deciding its own timing (levanter's `add_hook(fn, every=N)`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


def due(step: int, every: int) -> bool:
    """Whether `step` is one of every `every` steps; `every=0` never is."""
    return bool(every) and step % every == 0


class StepTimer:
    """Seconds per step since the last restart. The loop restarts it after a step that ran eval, logging or
    saving, so that work is not counted as training time."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def per_step(self) -> float:
        return (time.perf_counter() - self.start) / self.steps


@dataclass
class StepInfo:
    """One finished step, as its hooks see it; a hook leaves here what later hooks and the loop read."""

    step: int
    loss: torch.Tensor  # this rank's, on the device
    grad_norm: torch.Tensor
    started: float  # time.perf_counter() when the step began
    timer: StepTimer
    first: bool  # the first step of this launch
    last: bool  # the run's last step
    logged: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)  # this step's metrics, when logged
    stopping: bool = False  # every rank agreed to stop after this step
    untimed: bool = False  # eval, logging or saving ran: the timer restarts after this step


@dataclass(frozen=True)
class Hook:
    fn: Callable[[StepInfo], None]
    every: int = 1
    first: bool = False  # also on the first step of a launch
    last: bool = False  # also on the run's last step

    def due(self, info: StepInfo) -> bool:
        return due(info.step, self.every) or (self.first and info.first) or (self.last and info.last)


class Hooks:
    """Hooks run in the order they were added: before every step (inside its time), or after each step they are due."""

    def __init__(self) -> None:
        self.before: list[Callable[[], None]] = []
        self.after: list[Hook] = []

    def add_before(self, fn: Callable[[], None]) -> None:
        self.before.append(fn)

    def add(self, fn: Callable[[StepInfo], None], every: int = 1, *, first: bool = False, last: bool = False) -> None:
        self.after.append(Hook(fn, every, first, last))

    def before_step(self) -> None:
        for fn in self.before:
            fn()

    def after_step(self, info: StepInfo) -> None:
        for hook in self.after:
            if hook.due(info):
                hook.fn(info)
