"""The node-loss half of benchmarks/elastic.py: each side runs in its own child process (`elastic.py --side S`),
loses one of its three workers' machines after step `--loss-step`, and reports the time from that loss to the
first step completed on the two that are left.

  phalanx    `phalanx ray` on a 3-node `ray.cluster_utils.Cluster` (one CPU, so one worker, per node), with
             fault.elastic=true, fault.min_workers=2 and fault.wait_for_nodes_s=0 (shrink at once, as Ray Train's
             elastic policy does): the survivors restart as the planner's 2-worker layout, resharded from keeper
             memory. The node is removed with `Cluster.remove_node` (its raylet and every process on it die; Ray's
             control store learns of it at once, as it does of a node whose raylet exits).
  raytrain   Ray Train's own elastic training on the same cluster: `ScalingConfig(num_workers=(2, 3))` and
             `FailureConfig(max_failures=1)`; rank 0 reports a checkpoint every step (to local disk); after the
             loss Ray Train restarts the worker group with the 2 workers it can place, from that checkpoint
             (the loop of benchmarks/recovery.py).
  torchft    torchft's replica groups (no Ray): a lighthouse and three one-process replica groups on loopback,
             each a DDP replica of the same GPT through `torchft.Manager` (min_replica_size=2); the loss is a
             SIGKILL of one replica's process; the survivors drop it from the next quorum and go on.

Every side trains phalanx's GPT (the config's model, data stream, AdamW and schedule) on gloo over loopback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from benchmarks.recovery import append, one, read_events, split

NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_for(condition: Callable[[], Any], what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise RuntimeError(f"node-loss benchmark: {what}: not within {timeout:.0f}s")


def cluster_of_three() -> Any:
    """A head and two nodes, one CPU each, all on loopback; this process is its driver. (Cluster would record
    its address in /tmp/ray, where a plain ray.init() of anyone on this machine would join it: not here.)"""
    import ray
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    from phalanx.launch.ray_setup import loopback_only

    loopback_only()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    ray._common.utils.reset_ray_address = lambda *args, **kwargs: None
    cluster = Cluster(initialize_head=True, head_node_args=dict(NODE))
    for _ in range(2):
        cluster.add_node(**NODE)
    cluster.connect()
    addresses = {n["NodeManagerAddress"] for n in ray.nodes()}
    if addresses != {"127.0.0.1"}:
        raise SystemExit(f"node-loss benchmark: Ray's node addresses are {sorted(addresses)}, not 127.0.0.1")
    return cluster


def remove_node_of(cluster: Any, node_id: str) -> float:
    """Removes the (non-head) node `node_id`; the instant just before, on this machine's clock."""
    node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    lost_at = time.time()
    cluster.remove_node(node)  # as tests/launch/test_ray_cluster.py: Ray's GCS learns of it at once
    return lost_at


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = target()
        except BaseException as err:  # raised by finish()
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def finish(thread: threading.Thread, result: dict, timeout: float, side: str) -> Any:
    thread.join(timeout=timeout)
    if thread.is_alive():
        raise RuntimeError(f"node-loss benchmark: the {side} run did not end within {timeout:.0f}s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def run_phalanx(args: Any, root: str, overrides: list[str]) -> dict[str, Any]:
    from phalanx.launch.controller import main as controller

    cluster = cluster_of_three()
    run_dir = os.path.join(root, "phalanx")
    overrides = [*overrides, f"run.dir={root}", "run.name=phalanx", "fault.elastic=true", "fault.min_workers=2",
                 "fault.wait_for_nodes_s=0", "checkpoint.keeper_linger_s=30"]
    thread, result = in_thread(lambda: controller(args.config, overrides, 3, None))
    log = os.path.join(run_dir, "events.jsonl")
    placed = wait_for(lambda: [e for e in read_events(log) if e["event"] == "workers"], "the workers' placement",
                      args.timeout)[0]
    wait_for(lambda: reached(run_dir) >= args.loss_step, f"step {args.loss_step}", args.timeout)
    head = cluster.head_node.node_id
    victim = next(r for r, node in enumerate(placed["node_ids"]) if r > 0 and node != head)
    last_step = reached(run_dir)
    lost_at = remove_node_of(cluster, placed["node_ids"][victim])
    code = finish(thread, result, args.timeout, "phalanx")
    if code != 0:
        raise RuntimeError(f"phalanx ray exited with {code}")
    events = read_events(log)
    failure = one(events, "failure", lost_at)
    restore = one(events, "restore", failure["time"])
    first = one(events, "first_step", restore["time"])
    resize = one(events, "resize", lost_at)
    out = split({"time": lost_at, "step": last_step}, failure["detected_at"], restore, first)
    out.update(restored_from=restore["restored_from"], to_layout=resize["to_layout"],
               to_workers=resize["to_workers"], replan_s=resize["replan_s"])
    return out


def reached(run_dir: str) -> int:
    """The newest step rank 0 has logged."""
    return max((m["step"] for m in read_events(os.path.join(run_dir, "metrics.jsonl"))), default=0)


def run_raytrain(args: Any, root: str, overrides: list[str]) -> dict[str, Any]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from benchmarks.recovery import raytrain_detection_callback, raytrain_loop

    cluster = cluster_of_three()
    log = os.path.join(root, "raytrain-events.jsonl")
    trainer = TorchTrainer(
        raytrain_loop,
        train_loop_config={"events": log, "config": args.config, "overrides": overrides, "kill_rank": None,
                           "log_steps": True, "stop_after_recovery": True},
        scaling_config=ScalingConfig(num_workers=(2, 3), use_gpu=False),
        run_config=RunConfig(name="raytrain", storage_path=os.path.join(root, "ray_results"),
                             failure_config=FailureConfig(max_failures=1),
                             callbacks=[raytrain_detection_callback(log)]),
    )
    thread, result = in_thread(trainer.fit)
    starts = wait_for(lambda: [e for e in read_events(log) if e["event"] == "fn_start"][:3]
                      if sum(e["event"] == "fn_start" for e in read_events(log)) >= 3 else None,
                      "three Ray Train workers", args.timeout)
    wait_for(lambda: any(e["event"] == "step" and e["step"] >= args.loss_step for e in read_events(log)),
             f"step {args.loss_step}", args.timeout)
    head = cluster.head_node.node_id
    victim = next(e for e in starts if e["rank"] > 0 and e["node"] != head)
    lost_at = remove_node_of(cluster, victim["node"])
    finish(thread, result, args.timeout, "Ray Train")
    events = read_events(log)
    detected = one(events, "detected", lost_at)
    restore = one(events, "restore", detected["time"])
    first = one(events, "first_step", restore["time"])
    stepped = [e["step"] for e in events if e["event"] == "step" and e["time"] < lost_at]
    out = split({"time": lost_at, "step": max(stepped)}, detected["time"], restore, first)
    workers = {e["world"] for e in events if e["event"] == "fn_start" and e["time"] > lost_at}
    out.update(restored_from="storage (ray.train checkpoint)", to_workers=min(workers, default=0))
    return out


# ---- torchft ---------------------------------------------------------------------------------------------


def run_torchft(args: Any, root: str, overrides: list[str]) -> dict[str, Any]:
    """A lighthouse here and three replica processes (`elastic.py --side torchft-replica`); SIGKILL one after
    step --loss-step; the first step both survivors commit in a quorum of two ends the downtime."""
    from torchft.coordination import LighthouseServer

    lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=2)
    address = "http://127.0.0.1:" + lighthouse.address().rsplit(":", 1)[1]  # it names this host otherwise
    log = os.path.join(root, "torchft-events.jsonl")
    procs = []
    try:
        for replica in range(3):
            cmd = [sys.executable, os.path.join(REPO, "benchmarks", "elastic.py"), "--side", "torchft-replica",
                   "--root", root, "--replica", str(replica), "--lighthouse", address,
                   "--config", args.config, "--steps", str(args.steps), *overrides]
            procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=open(os.path.join(root, f"replica-{replica}.log"),
                                          "w"), stderr=subprocess.STDOUT, start_new_session=True))
        wait_for(lambda: any(e["event"] == "step" and e["step"] >= args.loss_step and e["participants"] == 3
                             for e in read_events(log)), f"step {args.loss_step} with 3 replicas", args.timeout)
        lost_at = time.time()
        os.killpg(procs[2].pid, signal.SIGKILL)
        deadline = time.monotonic() + args.timeout
        for proc in procs[:2]:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            if code != 0:
                raise RuntimeError(f"torchft replica exited with {code}; see {root}/replica-*.log")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        lighthouse.shutdown()
    events = read_events(log)
    before = [e["step"] for e in events if e["event"] == "step" and e["time"] < lost_at]
    after = [e for e in events if e["event"] == "step" and e["time"] > lost_at and e["participants"] == 2]
    first = min(after, key=lambda e: e["time"])
    failed = [e for e in events if e["event"] == "not_committed" and e["time"] > lost_at]
    return {"downtime_s": first["time"] - lost_at, "killed_after_step": max(before), "restored_step": max(before),
            "steps_lost": 0, "failed_steps": len(failed), "restored_from": "survivors' own state (no restore)",
            "to_workers": 2, "detect_s": None, "restart_s": None, "restore_s": None, "first_step_s": None}


def torchft_replica(args: Any, overrides: list[str]) -> int:
    """One torchft replica group of one process: phalanx's GPT, its gradients averaged over the quorum by
    `Manager.allreduce`; every step is an event: committed (with the quorum's size) or not."""
    import socket

    import torch
    import torch.nn.functional as F
    import torchft.manager
    from torch.distributed import TCPStore
    from torchft import Manager, ProcessGroupGloo

    from phalanx.config import load_config
    from phalanx.data import DataPosition, build_dataset
    from phalanx.models import build_on_meta, materialize
    from phalanx.trainer.optim import build_optimizer, build_schedule

    # torchft binds its manager server to every interface ("[::]:port") and advertises this host's name; here,
    # loopback only.
    socket.gethostname = lambda: "127.0.0.1"
    server = torchft.manager.ManagerServer
    torchft.manager.ManagerServer = lambda *a, bind, **kw: server(*a, bind="127.0.0.1:" + bind.rsplit(":", 1)[1],
                                                                  **kw)
    torch.set_num_threads(1)
    log = os.path.join(args.root, "torchft-events.jsonl")
    cfg = load_config(args.config, overrides)
    model = materialize(build_on_meta(cfg.model), torch.device("cpu"), cfg.run.seed)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    schedule = build_schedule(optimizer, cfg.optim, cfg.train.steps)
    # each replica its own share of every global batch of 3 x micro-batch samples (the 3 replicas' batch)
    data = DataPosition(build_dataset(cfg), 3 * cfg.train.micro_batch_size, cfg.train.micro_batch_size,
                        args.replica, 3)
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)

    def state_dict() -> dict:
        return {"model": model.state_dict(), "optim": optimizer.state_dict()}

    def load_state_dict(state: dict) -> None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])

    manager = Manager(pg=ProcessGroupGloo(), min_replica_size=2, load_state_dict=load_state_dict,
                      state_dict=state_dict, replica_id=f"replica-{args.replica}", store_addr="127.0.0.1",
                      store_port=store.port, rank=0, world_size=1, lighthouse_addr=args.lighthouse,
                      hostname="127.0.0.1")
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        while manager.current_step() < args.steps:
            manager.start_quorum()  # what torchft's OptimizerWrapper.zero_grad does
            optimizer.zero_grad(set_to_none=True)
            (batch,) = data.next_step()
            logits = model(batch[:, :-1])
            F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(0, 1)).backward()
            # averaged over the quorum; a failed reduction is recorded by the manager, and the step not committed
            # (torchft's DistributedDataParallel hook asserts on a failed one in 0.2.0 with gloo on CPU)
            for work in [manager.allreduce(p.grad) for p in params]:
                work.wait()
            if manager.should_commit():  # every replica of the quorum reduced its gradients: the step counts
                optimizer.step()
                schedule.step()
                append(log, "step", replica=args.replica, step=manager.current_step(),
                       participants=manager.num_participants())
            else:
                append(log, "not_committed", replica=args.replica, step=manager.current_step())
    finally:
        manager.shutdown(wait=False)
    return 0
