"""Pipeline schedules: GPipe, 1F1B and interleaved 1F1B, run by `torch.distributed.pipelining`.

torch's schedules compose with phalanx's strategies as they are: a stage module wrapped in DDP or
FSDP2 gets its gradient synchronisation on the last micro-batch from torch's stage code, Ulysses
and MoE all-to-alls run inside a stage's forward and backward, and the MoE aux losses reach the
router in each stage's own backward. So phalanx adds no schedule of its own; it adds timing:
`TimedStage` measures each stage's compute (forward and backward of every micro-batch), and the
runner the wall time of each schedule run, giving the measured bubble, idle / wall, per rank.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import torch
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from phalanx.telemetry import comm

SCHEDULE_CLASSES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}


def theoretical_bubble(pp: int, microbatches: int, virtual: int = 1) -> float:
    """Idle share of a step with equal stages: (p - 1) / (m + p - 1); interleaving divides the ramp by v."""
    return (pp - 1) / (virtual * microbatches + pp - 1)


class TimedStage(PipelineStage):
    """A `PipelineStage` that adds up the seconds its forward and backward chunks compute."""

    busy = 0.0

    @contextlib.contextmanager
    def _computing(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.busy += time.perf_counter() - start

    def forward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
        with self._computing():
            return super().forward_one_chunk(*args, **kwargs)

    def backward_one_chunk(self, *args: Any, **kwargs: Any) -> Any:
        with self._computing():
            return super().backward_one_chunk(*args, **kwargs)

    # Activations and their gradients between stages: counted as sends over pp (parallel.comm_stats).
    def get_fwd_send_ops(self, fwd_chunk_id: int) -> list:
        return comm.count_sends(super().get_fwd_send_ops(fwd_chunk_id), "pp")

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list:
        return comm.count_sends(super().get_bwd_send_ops(bwd_chunk_id), "pp")


class PipelineRunner:
    """Runs this rank's stages under one schedule; `run` is one schedule pass over `microbatches` chunks."""

    def __init__(self, modules: list[torch.nn.Module], plans: list[Any], total_stages: int, schedule: str,
                 microbatches: int, group: Any, device: torch.device, loss_fn: Callable):
        """`loss_fn(logits, targets)` is the per-micro-batch loss; it is multiplied by `loss_scale` (set by the
        trainer to 1 / micro-batches per step, as in a plain accumulation loop; torch's own scaling is off)."""
        self.loss_scale = 1.0
        self.stages = [TimedStage(module, plan.index, total_stages, device, group=group)
                       for module, plan in zip(modules, plans)]
        self.has_first = any(plan.first for plan in plans)
        self.has_last = any(plan.last for plan in plans)
        self.microbatches, self.device = microbatches, device
        cls = SCHEDULE_CLASSES[schedule]
        target = self.stages if schedule == "interleaved" else self.stages[0]
        self.schedule = cls(target, n_microbatches=microbatches, loss_fn=self._loss(loss_fn), scale_grads=False)
        self.wall, self.runs = 0.0, 0

    def _loss(self, loss_fn: Callable) -> Callable:
        return lambda logits, targets: loss_fn(logits, targets) * self.loss_scale

    def run(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one batch (split into micro-batches); on the last stage the sum of the
        scaled micro-batch losses, else 0."""
        losses: list[torch.Tensor] = []
        start = time.perf_counter()
        self._step(self.schedule.step, inputs, targets, losses)
        self.wall += time.perf_counter() - start
        self.runs += 1
        return torch.stack(losses).sum().detach() if self.has_last else torch.zeros((), device=self.device)

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss over the micro-batches of one batch on the last stage, else 0."""
        losses: list[torch.Tensor] = []
        scale, self.loss_scale = self.loss_scale, 1.0 / self.microbatches
        try:
            self._step(self.schedule.eval, inputs, targets, losses)
        finally:
            self.loss_scale = scale
        return torch.stack(losses).sum() if self.has_last else torch.zeros((), device=self.device)

    def _step(self, fn: Callable, inputs: torch.Tensor, targets: torch.Tensor, losses: list) -> None:
        args = (inputs,) if self.has_first else ()
        kwargs = {"target": targets, "losses": losses} if self.has_last else {}
        fn(*args, **kwargs)

    def take_timing(self) -> tuple[float, float, int]:
        """(busy, wall, runs) since the last call: seconds this rank's stages computed, seconds the schedule ran,
        and how many schedule runs that was."""
        busy = sum(stage.busy for stage in self.stages)
        out = (busy, self.wall, self.runs)
        for stage in self.stages:
            stage.busy = 0.0
        self.wall, self.runs = 0.0, 0
        return out
