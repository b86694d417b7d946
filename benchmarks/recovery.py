"""Recovery downtime: phalanx's Ray controller vs Ray Train's `TorchTrainer` + `FailureConfig`, one run.

    .venv/bin/python benchmarks/recovery.py [--workers 2] [--steps 16] [--kill-step 8] [--repeats 1]
    .venv/bin/python benchmarks/recovery.py --quick     # a tiny GPT, 6 steps, kill after step 3: checks it runs

Ray Train is the `bench` extra (`pip install -e '.[bench]'`: ray[train], which brings pandas and pyarrow).
Without it the script says so on stderr and exits with status 77 (skipped), before starting either side.

Both sides train the same GPT (configs/tiny.yaml: phalanx's model class, data stream, AdamW and LR
schedule) with `--workers` CPU ranks over gloo on a local Ray cluster that listens on loopback only,
and in both rank 1's process is killed with SIGKILL right after step `--kill-step`:

- phalanx: `phalanx ray` (the controller in `phalanx/launch/controller.py`) with
  `fault.inject=[kill:rank=1:step=K]`; the survivor is kept, the killed rank's slot gets the node's
  warm spare (`phalanx/launch/standby.py`), and the trainers restore from keeper memory.
- Ray Train: `TorchTrainer(FailureConfig(max_failures=1))`; rank 0 reports a checkpoint every step
  with `ray.train.report(..., checkpoint=...)` (to local disk, the cheapest storage there is) and a
  restarted worker group loads it from `ray.train.get_checkpoint()`.

Downtime runs from the kill (the victim's own timestamp just before `os.kill`) to the end of the
first step completed after recovery, split into
  detect      kill -> the system noticed (phalanx: its controller's `failure` event; Ray Train: its
              controller's `UserCallback.after_exception`, called when a poll finds the dead worker);
  restart     -> rank 0 begins restoring (stop the survivors, start workers, process group, model);
  restore     rank 0 loading the state (phalanx: keeper memory; Ray Train: the checkpoint files);
  first step  -> the first step after recovery finished on rank 0.
Every side runs in its own child process with its own Ray cluster, bounded by `--timeout`; both
children are one invocation of this script. Every config value is each system's default except
the kill, so detection intervals are the shipped ones (phalanx fault.heartbeat_s=1; Ray Train's
health check every 2 s).

Targets (issue 7): speedup = Ray Train downtime / phalanx downtime >= 5; phalanx downtime <= 10 s.
Last line: JSON with `speedup`, both downtimes and every phase.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PHASES = ("detect_s", "restart_s", "restore_s", "first_step_s")
# Keep the benchmark's own output readable; every config value that matters stays at its default.
QUIET = ["log.wandb=disabled", "log.progress=none", "train.eval_every=0"]
# --quick: a smaller GPT and fewer steps on both sides; not a result.
QUICK = {"steps": 6, "kill_step": 3, "timeout": 180.0,
         "overrides": ["model.d_model=64", "model.n_layers=2", "model.max_seq_len=32", "data.seq_len=32",
                       "train.batch_size=8", "train.micro_batch_size=4"]}
SKIPPED = 77  # exit status when Ray Train is not installed (as automake's test drivers read it)


def ray_train_missing() -> Optional[str]:
    """Why `ray.train` cannot be imported (it needs the `bench` extra), or None."""
    try:
        import ray.train  # noqa: F401
    except ImportError as err:
        return str(err)
    return None


def loopback_env() -> None:
    """Everything Ray and gloo start inherits these: gloo on loopback, one intra-op thread per rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def start_ray(num_cpus: int) -> None:
    """A new local Ray instance that binds and advertises 127.0.0.1 only (`phalanx ray`'s own start)."""
    import ray

    from phalanx.launch.ray_setup import start_local_ray

    start_local_ray(num_cpus=num_cpus, log_to_driver=False)
    addresses = {n["NodeManagerAddress"] for n in ray.nodes()}
    if addresses != {"127.0.0.1"}:
        raise SystemExit(f"recovery benchmark: Ray's node address is {sorted(addresses)}, not 127.0.0.1; "
                         f"refusing to run off loopback")


def read_events(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append(path: str, event: str, **fields: Any) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"time": time.time(), "event": event, **fields}) + "\n")


def split(kill: dict, detected_at: float, restore: dict, first: dict) -> dict[str, Any]:
    """Phases from four instants on one clock (every process runs on this machine)."""
    restore_start = restore["time"] - restore["seconds"]
    return {
        "detect_s": detected_at - kill["time"],
        "restart_s": restore_start - detected_at,
        "restore_s": restore["seconds"],
        "first_step_s": first["time"] - restore["time"],
        "downtime_s": first["time"] - kill["time"],
        "killed_after_step": kill["step"],
        "restored_step": restore["step"],
        "steps_lost": kill["step"] - restore["step"],
    }


def one(events: list[dict], name: str, after: float = 0.0) -> dict:
    found = [e for e in events if e["event"] == name and e["time"] >= after]
    if not found:
        raise RuntimeError(f"no '{name}' event after the kill; events: {[e['event'] for e in events]}")
    return found[0]


# ---- phalanx ---------------------------------------------------------------------------------


def run_phalanx(args: argparse.Namespace, root: str) -> dict[str, Any]:
    from phalanx.launch.controller import main as controller

    start_ray(num_cpus=2 * args.workers)
    overrides = [*QUIET, *args.overrides, f"train.steps={args.steps}", f"run.dir={root}", "run.name=phalanx",
                 f"fault.inject=[kill:rank=1:step={args.kill_step}]", "checkpoint.keeper_linger_s=30"]
    code = controller(args.config, overrides, args.workers, None)
    if code != 0:
        raise RuntimeError(f"phalanx ray exited with {code}")
    events = read_events(os.path.join(root, "phalanx", "events.jsonl"))
    kill = one(events, "fault_injected")
    failure = one(events, "failure", kill["time"])
    restore = one(events, "restore", failure["time"])
    first = one(events, "first_step", restore["time"])
    result = split(kill, failure["detected_at"], restore, first)
    result["restored_from"] = restore["restored_from"]
    result["controller_event"] = {k: v for k, v in one(events, "recovery").items() if k.endswith("_s")}
    return result


# ---- Ray Train -------------------------------------------------------------------------------


def raytrain_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: phalanx's model, data and optimizer in a plain DDP loop with Ray Train's
    checkpointing. Writes its timing events to `config["events"]` (every step's too with "log_steps", and ends
    two steps after a restore with "stop_after_recovery"); kills
    itself once, like phalanx's fault injection, right after the checkpoint of the kill step is reported (unless
    "kill_rank" is None)."""
    import contextlib
    import signal as signal_
    import tempfile as tempfile_

    import ray.train
    import ray.train.torch
    import torch
    import torch.nn.functional as F

    from phalanx.config import load_config
    from phalanx.data import DataPosition, build_dataset
    from phalanx.models import build_on_meta, materialize
    from phalanx.trainer.optim import build_optimizer, build_schedule

    log = config["events"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    append(log, "fn_start", rank=rank, world=world, node=ray.get_runtime_context().get_node_id())
    cfg = load_config(config["config"], config["overrides"])
    torch.manual_seed(cfg.run.seed)
    model = materialize(build_on_meta(cfg.model), torch.device("cpu"), cfg.run.seed)
    model = ray.train.torch.prepare_model(model)  # DDP over the process group Ray Train set up
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    schedule = build_schedule(optimizer, cfg.optim, cfg.train.steps)
    data = DataPosition(build_dataset(cfg), cfg.train.batch_size, cfg.train.micro_batch_size, rank, world)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        start = time.perf_counter()
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, "state.pt"), weights_only=False)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])
        schedule.load_state_dict(state["lr_schedule"])
        data.load_state_dict(state["data"])
        step = state["step"]
        if rank == 0:
            append(log, "restore", step=step, seconds=time.perf_counter() - start)
    first = step + 1
    while step < cfg.train.steps:
        micro = data.next_step()
        for i, batch in enumerate(micro):
            # DDP reduces gradients on the last micro-batch only, as phalanx's data parallelism does.
            with model.no_sync() if i < len(micro) - 1 else contextlib.nullcontext():
                logits = model(batch[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(0, 1)) / len(micro)
                loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if rank == 0:
            with tempfile_.TemporaryDirectory() as folder:
                torch.save({"model": model.module.state_dict(), "optim": optimizer.state_dict(),
                            "lr_schedule": schedule.state_dict(), "data": data.state_dict(), "step": step},
                           os.path.join(folder, "state.pt"))
                ray.train.report({"step": step, "loss": float(loss)},
                                 checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report({"step": step, "loss": float(loss)})
        if step == first and rank == 0:
            append(log, "first_step", step=step)
        if config.get("log_steps") and rank == 0:
            append(log, "step", step=step, world=world)
        if config.get("stop_after_recovery") and checkpoint is not None and step > first:
            break  # two steps after the recovery: what is timed is over
        if rank == config["kill_rank"] and step == config["kill_step"] and not any(
                e["event"] == "fault_injected" for e in read_events(log)):
            append(log, "fault_injected", rank=rank, step=step)
            os.kill(os.getpid(), signal_.SIGKILL)


def raytrain_detection_callback(log: str) -> Any:
    from ray.train.v2.api.callback import UserCallback

    class Detected(UserCallback):
        """Runs in Ray Train's controller: the moment its poll of the worker group finds an error."""

        def after_exception(self, run_context: Any, worker_exceptions: dict) -> None:
            append(log, "detected", ranks=sorted(worker_exceptions))

    return Detected()


def run_raytrain(args: argparse.Namespace, root: str) -> dict[str, Any]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if os.environ.get("RAY_TRAIN_V2_ENABLED", "1").lower() in ("0", "false"):
        raise SystemExit("recovery benchmark: RAY_TRAIN_V2_ENABLED=0 selects Ray Train V1, whose controller has no "
                         "after_exception callback to time detection by; unset it (V2 is the installed default)")
    start_ray(num_cpus=2 * args.workers)
    log = os.path.join(root, "raytrain-events.jsonl")
    trainer = TorchTrainer(
        raytrain_loop,
        train_loop_config={"events": log, "config": args.config, "overrides": [*QUIET, *args.overrides, f"train.steps={args.steps}"],
                           "kill_rank": 1, "kill_step": args.kill_step},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False),
        run_config=RunConfig(name="raytrain", storage_path=os.path.join(root, "ray_results"),
                             failure_config=FailureConfig(max_failures=1),
                             callbacks=[raytrain_detection_callback(log)]),
    )
    trainer.fit()
    events = read_events(log)
    kill = one(events, "fault_injected")
    detected = one(events, "detected", kill["time"])
    restore = one(events, "restore", detected["time"])
    first = one(events, "first_step", restore["time"])
    result = split(kill, detected["time"], restore, first)
    result["restored_from"] = "storage (ray.train checkpoint)"
    return result


# ---- the parent: both sides, one table -------------------------------------------------------


def child(side: str, args: argparse.Namespace, root: str) -> dict[str, Any]:
    """One side in its own process and Ray cluster, bounded by --timeout (its process group is killed)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--root", root, "--workers", str(args.workers),
           "--steps", str(args.steps), "--kill-step", str(args.kill_step), "--config", args.config, *args.overrides]
    return run_side(cmd, os.path.join(root, f"{side}.json"), os.path.join(root, f"{side}.log"), args.timeout,
                    f"recovery benchmark: the {side} side")


def run_side(cmd: list[str], out: str, log_path: str, timeout: float, what: str) -> dict[str, Any]:
    """`cmd` in its own process group with its output in `log_path`, killed whole after `timeout` seconds; the
    JSON it wrote to `out`. A failure ends the benchmark naming `what` and the log's last lines."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            code = None
    if code != 0 or not os.path.exists(out):
        with open(log_path) as f:
            tail = "".join(f.readlines()[-25:])
        why = f"timed out after {timeout:.0f}s" if code is None else f"exited with {code}"
        raise SystemExit(f"{what} {why}; last lines of {log_path}:\n{tail}")
    with open(out) as f:
        return json.load(f)


def median_result(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median downtime, the lower middle one for an even count (its phases add up;
    a per-phase median would not). Every repeat's downtime is kept beside it."""
    ordered = sorted(results, key=lambda r: r["downtime_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["downtimes_s"] = [round(r["downtime_s"], 3) for r in results]
    return chosen


def table(phalanx: dict[str, Any], raytrain: dict[str, Any]) -> str:
    rows = [("phase", "phalanx s", "Ray Train s", "Ray Train / phalanx")]
    for key in (*PHASES, "downtime_s"):
        ratio = raytrain[key] / phalanx[key] if phalanx[key] > 0 else float("nan")
        rows.append((key[:-2].replace("_", " "), f"{phalanx[key]:.3f}", f"{raytrain[key]:.3f}", f"{ratio:.1f}x"))
    rows.append(("restored from", phalanx["restored_from"], raytrain["restored_from"], ""))
    rows.append(("restored step (killed after)", f"{phalanx['restored_step']} ({phalanx['killed_after_step']})",
                 f"{raytrain['restored_step']} ({raytrain['killed_after_step']})", ""))
    rows.append(("steps lost", str(phalanx["steps_lost"]), str(raytrain["steps_lost"]), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.yaml"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--kill-step", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, alternating order; the median run is reported")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one side may run")
    parser.add_argument("overrides", nargs="*", help="config overrides for both sides, e.g. "
                        "train.micro_batch_size=4 for --workers 4")
    parser.add_argument("--quick", action="store_true", help="a tiny GPT, 6 steps, kill after step 3 "
                        "(the test suite's run)")
    parser.add_argument("--side", choices=("phalanx", "raytrain"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    if args.workers < 2:
        parser.error(f"--workers {args.workers}: rank 1 is killed, so at least 2 workers are needed")
    if not 1 <= args.kill_step < args.steps:
        parser.error(f"--kill-step {args.kill_step} must be in [1, --steps) = [1, {args.steps}) so a step follows it")
    loopback_env()

    missing = ray_train_missing()
    if missing:
        print(f"recovery benchmark: skipped: its anchor needs Ray Train, which is not installed ({missing}); "
              f"install the bench extra: pip install -e '.[bench]'", file=sys.stderr)
        return SKIPPED

    if args.side:  # a child: one side, its result as JSON in --root
        result = (run_phalanx if args.side == "phalanx" else run_raytrain)(args, args.root)
        with open(os.path.join(args.root, f"{args.side}.json"), "w") as f:
            json.dump(result, f)
        return 0

    results: dict[str, list[dict[str, Any]]] = {"phalanx": [], "raytrain": []}
    with tempfile.TemporaryDirectory(prefix="phalanx-recovery-") as root:
        for repeat in range(args.repeats):
            order = ("phalanx", "raytrain") if repeat % 2 == 0 else ("raytrain", "phalanx")
            for side in order:
                folder = os.path.join(root, f"{side}-{repeat}")
                os.makedirs(folder)
                started = time.time()
                results[side].append(child(side, args, folder))
                print(f"{side} run {repeat + 1}/{args.repeats}: downtime {results[side][-1]['downtime_s']:.3f}s "
                      f"(whole run {time.time() - started:.0f}s)", flush=True)
    phalanx, raytrain = median_result(results["phalanx"]), median_result(results["raytrain"])
    load = os.getloadavg()
    print(f"\nrecovery after SIGKILL of rank 1 after step {args.kill_step} of {args.steps}; {args.workers} CPU workers; "
          f"{platform.machine()}, {os.cpu_count()} cores, load average {load[0]:.1f}")
    print(table(phalanx, raytrain))
    speedup = raytrain["downtime_s"] / phalanx["downtime_s"]
    print(f"speedup {speedup:.1f}x (target >= 5); phalanx downtime {phalanx['downtime_s']:.2f}s (target <= 10 s)")
    print(json.dumps({
        "speedup": round(speedup, 2),
        "phalanx_downtime_s": round(phalanx["downtime_s"], 3),
        "raytrain_downtime_s": round(raytrain["downtime_s"], 3),
        "phalanx": {k: round(v, 3) if isinstance(v, float) else v for k, v in phalanx.items()},
        "raytrain": {k: round(v, 3) if isinstance(v, float) else v for k, v in raytrain.items()},
        "workers": args.workers, "overrides": args.overrides, "steps": args.steps, "kill_step": args.kill_step, "repeats": args.repeats,
        "targets_met": speedup >= 5 and phalanx["downtime_s"] <= 10,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
