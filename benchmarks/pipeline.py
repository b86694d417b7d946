"""Pipeline parallelism: the measured bubble against theory, and phalanx's pipelined step against a
hand-built `torch.distributed.pipelining` run of the same model and micro-batches, in one run.

Part 1 (bubble): GPipe and 1F1B at p = 2, 4 and m = 4, 8 through phalanx's own `PipelineRunner`
(`TimedStage` busy time over each schedule run's wall time, averaged over the ranks). The stages
are synthetic and equal: each forward holds the stage for 20 ms and each backward for 40 ms
without using a core (a sleep), so 4 stages on this 2-core machine still run side by side as on
4 devices; the compute of a real model would make 4 processes share 2 cores and distort idle time.
Part 2 (speedup): the tiny GPT (configs/tiny_pp.yaml shape) at pp=2, 1F1B, 4 micro-batches: a
phalanx Trainer step (forward, backward, clip by the global norm, AdamW, LR schedule) against the
same step written by hand with `PipelineStage` + `Schedule1F1B` + global-norm clipping + AdamW over
a manually split model; the two alternate step by step.

    python benchmarks/pipeline.py [--steps 12] [--skip-bubble]
    python benchmarks/pipeline.py --quick      # 1F1B bubble at p=2, m=4 over one run, 2 timed steps: checks it runs

--quick also forks the ranks instead of spawning them, so they inherit the parent's imports (torch's
pipelining pulls in torch._dynamo: seconds per rank on a 2-core machine).

Last line: JSON with `speedup` = hand-built step time / phalanx step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from phalanx.parallel.local_ranks import free_port  # noqa: E402

FORWARD_S, BACKWARD_S = 0.020, 0.040
# --quick: one bubble case, timed over one schedule run, and two timed steps; not a result.
QUICK = {"steps": 2, "bubble_runs": 1, "schedules": ["1f1b"], "stages": [2], "micro": [4], "start_method": "fork"}


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)


class _Hold(torch.autograd.Function):
    """Identity that holds the stage busy for FORWARD_S in forward and BACKWARD_S in backward."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        time.sleep(FORWARD_S)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        time.sleep(BACKWARD_S)
        return grad


class _SyntheticStage(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Hold.apply(x * self.weight)


def _bubble_worker(rank: int, world: int, port: int, schedule: str, micro: int, runs: int, out: str) -> None:
    _env(rank, world, port)
    import torch.distributed as dist

    from phalanx.parallel.pipeline import StagePlan
    from phalanx.parallel.pipeline_schedule import PipelineRunner

    dist.init_process_group("gloo")
    plan = StagePlan(rank, (), rank == 0, rank == world - 1)
    runner = PipelineRunner([_SyntheticStage()], [plan], world, schedule, micro, dist.group.WORLD,
                            torch.device("cpu"), lambda y, target: (y - target).square().mean())
    x, target = torch.randn(micro, 8), torch.randn(micro, 8)
    runner.run(x, target)  # shape inference and warm-up
    runner.take_timing()
    for _ in range(runs):
        runner.run(x, target)
    busy, wall, _ = runner.take_timing()
    idle = torch.tensor([1.0 - busy / wall])
    dist.all_reduce(idle)
    if rank == 0:
        torch.save(float(idle) / world, out)
    dist.barrier()
    dist.destroy_process_group()


def bubble(schedule: str, pp: int, micro: int, runs: int = 3, start_method: str = "spawn") -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.pt")
        mp.start_processes(_bubble_worker, args=(pp, free_port(), schedule, micro, runs, out), nprocs=pp, join=True,
                           start_method=start_method)
        return torch.load(out)


def _speed_worker(rank: int, world: int, port: int, steps: int, out: str) -> None:
    _env(rank, world, port)
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from phalanx.config import load_config
    from phalanx.launch.run import init_distributed
    from phalanx.models import build_on_meta, materialize
    from phalanx.parallel import validate
    from phalanx.trainer import Trainer
    from phalanx.trainer.optim import build_optimizer

    with tempfile.TemporaryDirectory() as run_dir:
        overrides = ["parallel.dp=1", "train.micro_batch_size=2", "log.wandb=disabled", f"run.dir={run_dir}",
                     "train.batch_size=8"]
        cfg = validate(load_config(os.path.join(REPO, "configs", "tiny_pp.yaml"), overrides), world)
        ctx = init_distributed(cfg)
        trainer = Trainer(cfg, ctx, run_dir)

        # The hand-built anchor: split by hand (the same blocks per stage), PipelineStage, Schedule1F1B.
        model = build_on_meta(cfg.model)
        mine = trainer.pipeline.stages[0].submod.plan.blocks
        for name in list(model.layers):
            if name not in mine:
                del model.layers[name]
        if rank != 0:
            model.tok_embeddings = None
        if rank != world - 1:
            model.norm, model.output = None, None
        materialize(model, torch.device("cpu"), cfg.run.seed)
        stage = PipelineStage(model, rank, world, torch.device("cpu"), group=ctx.mesh["pp"].get_group())
        micro = cfg.train.batch_size // cfg.train.micro_batch_size
        loss_fn = lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten(0, 1)) / micro  # noqa: E731
        schedule = Schedule1F1B(stage, n_microbatches=micro, loss_fn=loss_fn, scale_grads=False)
        optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))

        def anchor_step(batches: list[torch.Tensor]) -> None:
            batch = torch.cat(batches)
            if rank == 0:
                schedule.step(batch[:, :-1])
            else:
                schedule.step(target=batch[:, 1:], losses=[])
            # clip by the global norm: this stage's squared norm summed over the pipeline
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            squares = torch.nn.utils.get_total_norm(grads).square()
            dist.all_reduce(squares, group=ctx.mesh["pp"].get_group())
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), cfg.optim.grad_clip, squares.sqrt())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        times: dict[str, list[float]] = {"phalanx": [], "anchor": []}
        for i in range(steps + 2):
            batches = trainer.data.next_step()
            order = [("phalanx", lambda: trainer.train_step(batches)), ("anchor", lambda: anchor_step(batches))]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                dist.barrier()
                start = time.perf_counter()
                fn()
                dist.barrier()
                if i >= 2:
                    times[name].append(time.perf_counter() - start)
        if rank == 0:
            torch.save({k: statistics.median(v) for k, v in times.items()}, out)
        trainer = None  # its process groups go before destroy_process_group
        dist.barrier()
        dist.destroy_process_group()


def speed(steps: int, start_method: str = "spawn") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.pt")
        mp.start_processes(_speed_worker, args=(2, free_port(), steps, out), nprocs=2, join=True,
                           start_method=start_method)
        return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip-bubble", action="store_true")
    parser.add_argument("--bubble-runs", type=int, default=3, help="timed schedule runs per bubble case")
    parser.add_argument("--schedules", nargs="+", choices=("gpipe", "1f1b"), default=["gpipe", "1f1b"])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4], help="pipeline degrees p of the bubble part")
    parser.add_argument("--micro", type=int, nargs="+", default=[4, 8], help="micro-batch counts m of the bubble part")
    parser.add_argument("--start-method", choices=("spawn", "fork"), default="spawn", help="how ranks are started")
    parser.add_argument("--quick", action="store_true", help="one bubble case, 2 timed steps, forked ranks "
                        "(the test suite's run)")
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    from phalanx.parallel.pipeline_schedule import theoretical_bubble

    result: dict = {"benchmark": "pipeline", "torch": torch.__version__}
    if not args.skip_bubble:
        rows = []
        for schedule in args.schedules:
            for pp in args.stages:
                for micro in args.micro:
                    measured = bubble(schedule, pp, micro, args.bubble_runs, args.start_method)
                    theory = theoretical_bubble(pp, micro)
                    rows.append({"schedule": schedule, "p": pp, "m": micro, "measured": round(measured, 4),
                                 "theory": round(theory, 4), "diff_pp": round(100 * (measured - theory), 2)})
                    print(f"bubble {schedule:5s} p={pp} m={micro}: measured {measured:.3f}, theory {theory:.3f}, "
                          f"difference {100 * (measured - theory):+.1f} points", flush=True)
        result["bubble"] = rows
        result["bubble_max_diff_points"] = max(abs(r["diff_pp"]) for r in rows)
    times = speed(args.steps, args.start_method)
    print(f"pp=2 1F1B tiny GPT step: phalanx {times['phalanx'] * 1e3:.1f} ms, "
          f"hand-built torch.distributed.pipelining {times['anchor'] * 1e3:.1f} ms", flush=True)
    result.update(phalanx_ms=round(times["phalanx"] * 1e3, 2), anchor_ms=round(times["anchor"] * 1e3, 2),
                  speedup=round(times["anchor"] / times["phalanx"], 4))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
