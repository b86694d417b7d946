"""The Trainer: build -> loop -> hooks. It composes parallel strategies; it owns no parallel logic.

Build: the model on the meta device, then `parallel.parallelize` applies the layout's strategies in
their documented order and materialises it (initialised from `run.seed`, identical on every rank);
then `torch.compile` if asked, the optimizer, the data position and the snapshot engine.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from phalanx.checkpoint.collectives import checkpoint_group as snapshot_group
from phalanx.checkpoint.snapshot import SnapshotEngine
from phalanx.config import PhalanxConfig
from phalanx.data import DataPosition, build_dataset
from phalanx.events import append_event
from phalanx.faults import FaultInjector
from phalanx.models import build_on_meta, flops_per_token
from phalanx.parallel.dist import DistContext, broadcast_object
from phalanx.parallel.expert import moe_layers, moe_metrics
from phalanx.parallel.layout import Layout
from phalanx.parallel.parallelize import parallelize
from phalanx.parallel.mesh import DATA_DIM
from phalanx.parallel.pipeline import num_stages
from phalanx.telemetry import comm, health
from phalanx.trainer.metrics import memory_gib, peak_flops
from phalanx.trainer.hooks import Hooks, StepInfo, StepTimer, due
from phalanx.trainer.optim import (build_optimizer, build_schedule, global_param_groups, load_schedule_state,
                                   param_kinds, schedule_state)
from phalanx.trainer.rng import rng_state, seed_all, set_rng_state
from phalanx.trainer.signals import StopRequest
from phalanx.trainer.trackers import Tracker, open_trackers

if TYPE_CHECKING:
    from phalanx.parallel.pipeline_schedule import PipelineRunner

MetricsHook = Callable[["Trainer", dict], None]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss; logits (B, T, V) in any dtype, computed in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


class Trainer:
    """One rank's training loop. `state_dict()` is the whole resumable state (checkpoint contract)."""

    RANK_LOCAL_STATE = ("rng",)

    def __init__(self, cfg: PhalanxConfig, ctx: DistContext, run_dir: str):
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        self.device = ctx.device
        seed_all(cfg.run.seed)

        checkpoint_group = snapshot_group(ctx, cfg.fault.collective_timeout_s)  # before any back end's groups
        model = build_on_meta(cfg.model)
        self.n_params = model.num_params()
        self.param_kinds = param_kinds(model)  # saved state names the whole model's param groups (optim.py)
        layout = Layout.from_config(cfg)
        parts = parallelize(model, layout=layout, mesh=ctx.mesh, cfg=cfg, device=self.device, seed=cfg.run.seed)
        model, self.data_parallel, self.sequence, self.expert = parts.model, parts.data, parts.sequence, parts.expert
        data_parallel = self.data_parallel
        self.moe_layers = moe_layers(model)
        self.pipeline: Optional["PipelineRunner"] = None
        if parts.plans is not None:
            # only here: torch.distributed.pipelining imports torch._dynamo, 0.5 s of every rank's start
            from phalanx.parallel.pipeline_schedule import PipelineRunner

            self.pipeline = PipelineRunner(parts.stages, parts.plans, num_stages(cfg.parallel), layout.pp_schedule,
                                           layout.pipeline_microbatches(cfg.train.batch_size),
                                           ctx.mesh["pp"].get_group(), self.device, cross_entropy)
        if cfg.train.compile:
            model = torch.compile(model)
        comm.enable(cfg.parallel.comm_stats)

        self.optimizer = build_optimizer(model, cfg.optim, self.device)
        self.schedule = build_schedule(self.optimizer, cfg.optim, cfg.train.steps)
        self.model: nn.Module = data_parallel.wrap_optimizer(model, self.optimizer, ctx.mesh, cfg)
        dp_rank, dp_size = ctx.coord("dp")
        self.data = DataPosition(build_dataset(cfg), cfg.train.batch_size, cfg.train.micro_batch_size, dp_rank, dp_size)
        self.rank_local_keys = rank_local = self.RANK_LOCAL_STATE
        self._local_groups: Optional[list[list[str]]] = None  # this rank's param groups by name (state_dict())
        self.step = 0
        self.wandb_run_id: Optional[str] = None
        self.hooks: list[MetricsHook] = []  # called on every rank after each logged step with its metrics
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = peak_flops(self.device, cfg.train.dtype)
        self.last_lr = 0.0
        # Snapshots: after every `snapshot_every` steps into this node's keeper; persisted by the keepers while
        # training goes on, and by the trainers at the end or on a stop.
        self.snapshots = SnapshotEngine(cfg, ctx, run_dir, self.state_dict, rank_local,
                                        lambda kind, **fields: append_event(run_dir, kind, **fields),
                                        light_fn=self.changing_state, group=checkpoint_group)
        self.snapshots.setup(measure=data_parallel.snapshots_every_step)
        self.faults = FaultInjector(list(cfg.fault.inject), ctx.rank, run_dir)

    # ---- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Named and shaped globally, so it loads into any layout: the back end's model and optimizer state by
        parameter name (whole, or DTensor shards of the whole), the optimizer's groups as one process has them."""
        model_state, optim_state = self.data_parallel.state_dict(self.model, self.optimizer)
        self._local_groups = [list(group["params"]) for group in optim_state["param_groups"]]
        optim_state["param_groups"] = self._param_groups(with_params=True)
        return {"model": model_state, "optim": optim_state, **self._small_state()}

    def changing_state(self) -> dict[str, Any]:
        """The part of `state_dict()` that is not tensors updated in place — cheap to build every step."""
        return {"optim": {"param_groups": self._param_groups(with_params=False)}, **self._small_state()}

    def _param_groups(self, with_params: bool) -> list[dict[str, Any]]:
        return global_param_groups(self.optimizer.param_groups, self.param_kinds, self.cfg.optim.weight_decay,
                                   with_params)

    def _small_state(self) -> dict[str, Any]:
        """Everything but the model and the optimizer: values rebuilt on every call."""
        return {
            "lr_schedule": schedule_state(self.schedule),
            "data": self.data.state_dict(),
            "step": self.step,
            "trackers": {"wandb_run_id": self.wandb_run_id},
            "rng": rng_state(self.device),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._local_groups is None:
            self.state_dict()
        # The saved groups are one process's; this rank's optimizer has its own (a pipeline stage's parameters,
        # ep-sharded experts apart), each given the hyperparameters of the saved group its parameters are in.
        saved = state["optim"]["param_groups"]
        groups = [{**{k: v for k, v in next(g for g in saved if names[0] in g["params"]).items() if k != "params"},
                   "params": names} for names in self._local_groups if names]
        optim = {**state["optim"], "param_groups": groups}
        self.data_parallel.load_state_dict(self.model, self.optimizer, state["model"], optim)
        load_schedule_state(self.schedule, state["lr_schedule"])
        self.data.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.wandb_run_id = state["trackers"].get("wandb_run_id")
        if "rng" in state:
            set_rng_state(state["rng"], self.device)

    def save(self) -> None:
        """Persist the current step now and wait for it (end of run, stop request). Collective."""
        start = time.perf_counter()
        path = self.snapshots.persist_and_wait(self.step)
        if self.ctx.is_main:
            append_event(self.run_dir, "checkpoint", step=self.step, path=path, seconds=time.perf_counter() - start)

    def restore(self) -> Optional[int]:
        """Load the newest usable state — keeper memory, peers' memory, then storage; returns its step."""
        start = time.perf_counter()
        state, step, info = self.snapshots.restore(self.state_dict)
        if state is None:
            return None
        self.faults.restoring(step)
        self.load_state_dict(state)
        self.snapshots.state_replaced()
        seconds = time.perf_counter() - start
        if self.ctx.is_main:
            append_event(self.run_dir, "restore", step=step, restored_from=info["tier"], reason=info["reason"],
                         seconds=seconds, **({"ranks": info["tiers"]} if "tiers" in info else {}))
            if "resharded_from" in info:
                to = Layout.from_config(self.cfg).name()
                rng = ("each rank's RNG streams were restored" if "rng" in state else
                       f"RNG streams are per rank and not carried to another world size or from memory: each rank "
                       f"re-seeded them from run.seed={self.cfg.run.seed} (nothing in the model draws from them)")
                append_event(self.run_dir, "reshard", step=step, from_layout=info["resharded_from"], to_layout=to,
                             tier=info["tier"], seconds=seconds, rng=rng)
                self.print(f"resharded step {step} from {info['resharded_from']} to {to} ({info['tier']}, "
                           f"{seconds:.1f}s); {rng}")
        return step

    # ---- the step ------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.train.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, micro_batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over the micro-batches. Returns (loss, grad norm) as device tensors."""
        loss = self.forward_backward(micro_batches)
        return loss, self.optimizer_step()

    def forward_backward(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Accumulate gradients of the mean loss over this rank's micro-batches (synchronised on the last)."""
        health.phase("forward_backward")
        self._train_mode()
        accumulation = len(micro_batches)
        for layer in self.moe_layers:  # the aux losses are averaged over micro-batches like the loss
            layer.loss_scale = 1.0 / accumulation
        if self.pipeline is not None:
            total = self._pipeline_forward_backward(micro_batches)
        else:
            total = torch.zeros((), device=self.device)
            for i, batch in enumerate(micro_batches):
                inputs, targets, positions = self._split(batch)  # (B, T) each; T/sp under sequence parallelism
                with self.data_parallel.accumulate(self.model, sync=i == accumulation - 1):
                    with self._autocast():
                        loss = cross_entropy(self.model(inputs, positions), targets) / accumulation
                    self.data_parallel.backward(self.model, loss)
                total += loss.detach()
        if self.expert is not None:  # experts are reduced over their own group, not by the dp back end
            self.expert.reduce_gradients(self.model)
        return total

    def _pipeline_forward_backward(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """The micro-batches in schedule runs of `microbatches` each; the loss, known on the last stage, to all."""
        runner, per_run = self.pipeline, self.pipeline.microbatches
        runner.loss_scale = 1.0 / len(micro_batches)
        total = torch.zeros((), device=self.device)
        for first in range(0, len(micro_batches), per_run):
            inputs, targets, positions = self._split(torch.cat(micro_batches[first:first + per_run]))
            self.model.positions = positions  # every stage's RoPE reads its sequence shard's positions
            with self._autocast():
                total += runner.run(inputs, targets)
        self.data_parallel.reduce_pipeline_gradients(self.model, self.ctx.mesh)
        return total  # the last stage's loss; other stages hold 0 (_dp_mean gathers it when logged)

    def _train_mode(self, on: bool = True) -> None:
        self.model.train(on)
        for stage in self.pipeline.stages if self.pipeline is not None else ():
            stage.submod.train(on)

    def optimizer_step(self) -> torch.Tensor:
        """Clip, step the optimizer and the LR schedule, clear gradients. Returns the pre-clip grad norm."""
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        health.phase("optimizer")
        self.snapshots.wait_copied()  # the last snapshot's copies read the state this step changes
        pp_group = self.ctx.mesh["pp"].get_group() if self.pipeline is not None else None
        grad_norm = self.data_parallel.step(self.model, self.optimizer, self.cfg.optim.grad_clip or math.inf,
                                            pp_group)
        self.schedule.step()
        return grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        self._train_mode(False)
        losses = []
        if self.pipeline is not None:  # eval batches in groups of `microbatches`, one schedule run each
            per_run = self.pipeline.microbatches
            batches = list(self.data.eval_batches(-(-self.cfg.train.eval_batches // per_run) * per_run))
            for first in range(0, len(batches), per_run):
                inputs, targets, positions = self._split(torch.cat(batches[first:first + per_run]))
                self.model.positions = positions
                with self._autocast():
                    losses.append(self.pipeline.evaluate(inputs, targets))
            return self._dp_mean(torch.stack(losses).mean())
        for batch in self.data.eval_batches(self.cfg.train.eval_batches):
            inputs, targets, positions = self._split(batch)
            with self._autocast():
                losses.append(cross_entropy(self.model(inputs, positions), targets))
        return self._dp_mean(torch.stack(losses).mean())

    def _split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(B, T+1) tokens -> (inputs, targets, positions) on the device; positions None for a whole sequence."""
        batch = batch.to(self.device, non_blocking=True)
        if self.sequence is not None:
            return self.sequence.shard_batch(batch, self.ctx.mesh)
        return batch[:, :-1], batch[:, 1:], None

    def _dp_mean(self, value: torch.Tensor) -> float:
        """Mean over every rank that saw different tokens (dp x sp); equal token counts per rank.
        Under pipeline parallelism only the last stage holds the loss (the others 0): the sum over
        all ranks divided by dp x sp is the same mean, in one collective."""
        if self.ctx.distributed:
            value = value.detach().clone()
            if self.pipeline is not None:
                comm.all_reduce(value, None, "world")
                return float(value) / self.ctx.mesh[DATA_DIM].size()
            comm.all_reduce(value, self.ctx.mesh[DATA_DIM].get_group(), DATA_DIM, op=dist.ReduceOp.AVG)
        return float(value)

    # ---- the loop ------------------------------------------------------------------------

    def print(self, message: str) -> None:
        if self.ctx.is_main:
            print(message, flush=True)

    def fit(self) -> dict[str, Any]:
        """Train to `train.steps`, resuming from the newest checkpoint; returns the last logged metrics."""
        trackers = self._begin()
        stop = StopRequest().install()
        hooks = self._hooks(trackers, stop)
        metrics: dict[str, Any] = {}
        first_step = self.step + 1
        finished = False  # a run that ends or stops cleanly lets its keepers go
        try:
            timer = StepTimer()
            while self.step < self.cfg.train.steps:
                started = time.perf_counter()
                hooks.before_step()
                loss, grad_norm = self.train_step(self.data.next_step())
                self.step += 1
                timer.steps += 1
                info = StepInfo(self.step, loss, grad_norm, started, timer, first=self.step == first_step,
                                last=self.step == self.cfg.train.steps)
                hooks.after_step(info)
                metrics = info.metrics if info.logged else metrics
                if info.stopping:
                    self.print(f"stopped by signal at step {self.step}; checkpoint saved; "
                               f"relaunch the same command to resume")
                    if self.ctx.is_main:
                        append_event(self.run_dir, "interrupted", step=self.step, signal=stop.signal)
                    finished = True
                    return metrics
                if info.untimed:
                    timer.restart()
            self.save()
            if self.ctx.is_main:
                append_event(self.run_dir, "end", step=self.step)
            finished = True
        finally:
            stop.uninstall()
            self.snapshots.close(release=finished)
            for tracker in trackers:
                tracker.close()
        return metrics

    def _hooks(self, trackers: list[Tracker], stop: StopRequest) -> Hooks:
        """The loop's optional work, in the order it runs after a step."""
        hooks = Hooks()
        hooks.add_before(self.faults.before_step)
        # The first step of every launch is logged, and the last one.
        logged = {"every": self.cfg.log.every, "first": True, "last": True}
        hooks.add(self._measure, **logged)
        hooks.add(self._evaluate, every=self.cfg.train.eval_every, last=bool(self.cfg.train.eval_every))
        hooks.add(functools.partial(self._report, trackers), **logged)
        hooks.add(self._first_step_event, every=0, first=True)
        # Agreeing on a stop is a collective, so distributed ranks agree at logged steps only.
        hooks.add(functools.partial(self._agree_stop, stop), **(logged if self.ctx.distributed else {}))
        hooks.add(self._checkpoint)
        hooks.add(self._step_done)
        return hooks

    def _begin(self) -> list[Tracker]:
        """Restore the newest checkpoint (auto-resume), record the launch, open the trackers."""
        cfg = self.cfg
        resumed = self.restore() if cfg.run.resume else None
        if self.ctx.is_main:
            append_event(self.run_dir, "resume" if resumed is not None else "start", step=self.step,
                         world_size=self.ctx.world_size)
        if resumed is not None:
            self.print(f"resumed {self.run_dir} from checkpoint step-{resumed}")
        if self.step >= cfg.train.steps:
            self.print(f"{self.run_dir} is already at step {self.step} (train.steps={cfg.train.steps}); "
                       f"raise train.steps to train further")
        self.print(f"training {self.n_params / 1e6:.2f}M parameters on {self.ctx.world_size} x {self.device.type} "
                   f"for {cfg.train.steps} steps -> {self.run_dir}")
        trackers: list[Tracker] = []
        if self.ctx.is_main:
            trackers, self.wandb_run_id = open_trackers(cfg, self.run_dir, self.step, self.wandb_run_id)
        self.wandb_run_id = broadcast_object(self.wandb_run_id, self.ctx)  # every rank checkpoints the same id
        return trackers

    # ---- hooks ---------------------------------------------------------------------------

    def _measure(self, info: StepInfo) -> None:
        """This step's metrics; the eval, logging and saving after it are not training time."""
        health.phase("log")
        loss = self._dp_mean(info.loss)  # waits for the device, so the timer's seconds are real
        info.metrics = self._metrics(loss, float(info.grad_norm), info.timer.per_step())
        if self.moe_layers:
            group = self.ctx.mesh[DATA_DIM].get_group() if self.ctx.distributed else None
            info.metrics.update(moe_metrics(self.moe_layers, group, self.data.accumulation))
        if self.pipeline is not None:
            info.metrics.update(self._bubble())
        info.logged = info.untimed = True

    def _evaluate(self, info: StepInfo) -> None:
        if info.logged:  # a validation loss is reported with a logged step's metrics
            info.metrics["val_loss"] = self.evaluate()

    def _report(self, trackers: list[Tracker], info: StepInfo) -> None:
        """The metrics to the trackers, the controller and the metrics hooks."""
        for tracker in trackers:
            tracker.log(info.metrics)
        if self.ctx.is_main:
            health.HEALTH.metrics = {k: v for k, v in info.metrics.items() if k != "comm"}  # streamed to a controller
        for hook in self.hooks:
            hook(self, info.metrics)

    def _first_step_event(self, info: StepInfo) -> None:
        if self.ctx.is_main:  # a controller times recovery by it
            append_event(self.run_dir, "first_step", step=info.step)

    def _agree_stop(self, stop: StopRequest, info: StepInfo) -> None:
        """Every rank stops at the same step if any rank was asked to (SIGTERM may reach one)."""
        info.stopping = stop.requested
        if self.ctx.distributed:
            flag = torch.tensor([int(stop.requested)], device=self.device)
            comm.all_reduce(flag, None, "world", op=dist.ReduceOp.MAX)
            info.stopping = bool(flag.item())

    def _checkpoint(self, info: StepInfo) -> None:
        """On an agreed stop, persist now; else launch the copies of a due snapshot (the keepers persist)."""
        persist = due(info.step, self.cfg.checkpoint.persist_every)
        snapshot = self.data_parallel.snapshots_every_step and due(info.step, self.cfg.checkpoint.snapshot_every)
        if info.stopping:
            self.save()
        elif snapshot or persist:
            health.phase("snapshot")
            self.snapshots.snapshot(info.step, persist=persist)
        info.untimed |= persist

    def _step_done(self, info: StepInfo) -> None:
        """The step's whole time, saving included, to the health report and the fault injector."""
        seconds = time.perf_counter() - info.started
        health.step_done(info.step, seconds)
        self.faults.after_step(info.step, seconds)

    def _bubble(self) -> dict[str, Any]:
        """Per-stage compute (busy) and idle seconds per step since the last logged step, and the measured
        bubble: the idle share of the schedule runs, averaged over the pp ranks."""
        busy, wall, runs = self.pipeline.take_timing()
        steps = max(1.0, runs * self.pipeline.microbatches / self.data.accumulation)
        mine = torch.tensor([busy / steps, (wall - busy) / steps], dtype=torch.float64, device=self.device)
        every = comm.all_gather(mine, self.ctx.mesh["pp"].get_group(), "pp")  # (pp, 2), in rank order
        busy_s, idle_s = every[:, 0].tolist(), every[:, 1].tolist()
        p = self.cfg.parallel
        from phalanx.parallel.pipeline_schedule import theoretical_bubble

        return {
            "pp_bubble": sum(i / (b + i) if b + i > 0 else 0.0 for b, i in zip(busy_s, idle_s)) / len(busy_s),
            "pp_bubble_theory": theoretical_bubble(p.pp, self.pipeline.microbatches, num_stages(p) // p.pp),
            "pp_busy_s": busy_s,  # per pp rank (its stages), seconds per step
            "pp_idle_s": idle_s,
        }

    def _metrics(self, loss: float, grad_norm: float, seconds: float) -> dict[str, Any]:
        tokens_per_s = self.cfg.train.batch_size * self.cfg.data.seq_len / seconds
        per_device = tokens_per_s / self.ctx.world_size
        mfu = self.flops_per_token * per_device / self.peak_flops if self.peak_flops else None
        return {
            "step": self.step,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": self.last_lr,
            # the global sample ids this step trained on, [first, end): the same for every layout
            "samples": [self.data.consumed - self.cfg.train.batch_size, self.data.consumed],
            "step_seconds": seconds,
            "time": time.time(),  # wall clock as the step is measured: `phalanx report` places steps among the events
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": per_device,
            "mfu": mfu,
            "memory_gib": memory_gib(self.device),
            **({"comm": comm.STATS.take()} if comm.STATS.enabled else {}),
        }

