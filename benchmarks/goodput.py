"""Goodput under random faults: the effective training time (ETTR) that `phalanx ray` measures under a random
schedule of kills and node losses, against what the planner's simulator predicts for the same rates.

    .venv/bin/python benchmarks/goodput.py [--keep DIR]  # calibration + one run per rate (20-30 minutes here)
    .venv/bin/python benchmarks/goodput.py --again DIR   # the comparison again from runs kept in DIR
    .venv/bin/python benchmarks/goodput.py --quick       # one short run, one kill, terms from itself: checks it runs

Every run is `phalanx ray` on configs/tiny.yaml with 4 CPU workers on a 3-node `ray.cluster_utils.Cluster` on
loopback (the head has 2 CPUs, the others 1), erasure k=2, m=1 over the nodes, a snapshot every step and a persist
every 20. A node loss is the controller killing the node's keeper and workers (`fault.inject` "node" semantics): the
Ray node stays, so its workers start again there at once — the simulator's "spares" mode with a spare for every
loss. Two node losses in one recovery lose a group's second block, and the run restores from storage, as in the
simulator.

  1. calibration: one run with a kill, a node loss and a double node loss at fixed steps; its events give the terms
     (`phalanx/goodput_measure.py` `run_terms`): detect, restart (per cause), restore (keeper, peers, storage), the
     first step's excess, the steady step, the snapshot and persist overheads, and the launch and final save (paid
     once per run, added to the prediction's wall time);
  2. one run per rate, `fault.inject=[random:kill_per_min=K:node_per_min=N:seed=S]`, one fault per 30 s and one
     per 15 s (at one per 10 s a run here makes no progress: a recovery takes 12-45 s on 2 shared cores, so the next
     fault comes before it ends), each long enough for >= 10 faults: ETTR measured from its `events.jsonl` and
     `metrics.jsonl` (`measured_ettr`);
  3. the simulator (`phalanx/planner/goodput.py` `simulate`, mode "spares", mean over seeds), with the calibrated
     terms, for the run's kept steps, at the rates the schedule drew in that run (the faults it met over its fault
     window, first step to end): the acceptance, since what is compared is the cost of the failures, not the draw
     of how many came. Beside it, for diagnosis: the same with the run's own terms (what the model's structure
     misses, apart from the terms' drift between runs on a shared machine), and the calibrated terms at the nominal
     rates (mean and 10th-90th percentile over seeds: the spread one run's draw has). The simulator has one restart
     term and restarts here differ by path: it gets the mean of a killed rank's and a lost node's restart weighted by
     the rates, and a storage restore's longer restart goes into its restore.

Last line: JSON with `speedup` = predicted / measured ETTR at the faster rate (a ratio near 1 is agreement), and
each rate's figures. Target (issue 18): |measured - predicted| <= 5 percentage points at both rates.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.recovery import loopback_env, run_side  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "tiny.yaml")
COMMON = ["train.eval_every=0", "log.every=1", "log.wandb=disabled", "log.progress=none", "checkpoint.erasure_k=2",
          "checkpoint.erasure_m=1", "checkpoint.snapshot_every=1", "fault.max_restarts=1000",
          "checkpoint.keeper_linger_s=120"]
FULL = {"workers": 4, "cpus": [2, 1, 1], "persist_every": 20,
        "model": ["train.batch_size=16", "train.micro_batch_size=4"],
        # rank 1 (node 1) killed once its node's spare is warm, then again 4 steps after that recovery (the spare
        # that replaces the first is still importing); node 1 lost; nodes 1 and 2 lost at once (storage)
        "calibration": (270, ["kill:rank=1:step=80", "kill:rank=1:step=84", "node:node=1:step=170",
                              "node:node=1:step=250", "node:node=2:step=250"]),
        # (name, kills per minute, node losses per minute, steps, seed): one fault per 30 s and one per 15 s, each
        # long enough for >= 10 faults from its seed (the seeds are the rates' indices)
        "rates": [("1 per 30 s", 1.0, 1.0, 900, 0), ("1 per 15 s", 2.0, 2.0, 400, 1)]}
TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=32",
        "data.seq_len=32", "train.batch_size=6", "train.micro_batch_size=2", "optim.warmup_steps=2"]
# --quick: one kill 4.1 s into training (seed 3's first fault; its second comes at 41 s, after the run's end)
QUICK = {"workers": 3, "cpus": [1, 1, 1], "persist_every": 10, "model": TINY, "calibration": None,
         "rates": [("1 per 15 s", 3.0, 1.0, 80, 3)]}
SEEDS = 40  # simulator seeds per prediction
NODE = {"node_ip_address": "127.0.0.1", "include_dashboard": False}


# ---- the child: a cluster and the runs --------------------------------------------------------


def cluster(cpus: list[int]) -> Any:
    """A head and len(cpus) - 1 nodes on loopback, this process their driver (`benchmarks/parts/node_loss.py`)."""
    import ray
    import ray._common.utils
    import ray._private.utils
    from ray.cluster_utils import Cluster

    from phalanx.launch.ray_setup import loopback_only

    loopback_only()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    ray._common.utils.reset_ray_address = lambda *args, **kwargs: None
    made = Cluster(initialize_head=True, head_node_args=dict(NODE, num_cpus=cpus[0]))
    for n in cpus[1:]:
        made.add_node(**NODE, num_cpus=n)
    made.connect()
    addresses = {n["NodeManagerAddress"] for n in ray.nodes()}
    if addresses != {"127.0.0.1"}:
        raise SystemExit(f"goodput benchmark: Ray's node addresses are {sorted(addresses)}, not 127.0.0.1")
    return made


def one_run(plan: dict, root: str, name: str, steps: int, inject: list[str]) -> None:
    """`phalanx ray` once, in `root`/`name` (unless a run there finished: --keep runs again where it stopped)."""
    from phalanx.events import read_events
    from phalanx.launch.controller import main as controller

    if read_events(os.path.join(root, name), kinds={"controller_done"}):
        return

    overrides = [*COMMON, *plan["model"], f"checkpoint.persist_every={plan['persist_every']}",
                 f"train.steps={steps}", f"run.dir={root}", f"run.name={name}", f"fault.inject=[{','.join(inject)}]"]
    started = time.time()
    if controller(CONFIG, overrides, plan["workers"], None) != 0:
        raise RuntimeError(f"phalanx ray ({name}) did not finish")
    print(f"goodput benchmark: {name} done in {time.time() - started:.0f}s", flush=True)


def runs_of(plan: dict) -> dict[str, str]:
    """Each run's name in the report -> its folder's name."""
    names = {"calibration": "calibration"} if plan["calibration"] is not None else {}
    return {**names, **{rate[0]: f"rate{i}" for i, rate in enumerate(plan["rates"])}}


def child(plan: dict, root: str) -> dict[str, Any]:
    loopback_env()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    made = cluster(plan["cpus"])
    try:
        if plan["calibration"] is not None:
            steps, inject = plan["calibration"]
            one_run(plan, root, "calibration", steps, inject)
        for i, (_, kills, nodes, steps, seed) in enumerate(plan["rates"]):
            spec = f"random:kill_per_min={kills:g}:node_per_min={nodes:g}:seed={seed}"
            one_run(plan, root, f"rate{i}", steps, [spec])
        return runs_of(plan)
    finally:
        import ray

        ray.shutdown()
        made.shutdown()


def summary(run_dir: str) -> dict[str, Any]:
    """A finished run's measured ETTR and terms, and the faults it met over its fault window (first step to end)."""
    from phalanx.events import read_events
    from phalanx.goodput_measure import measured_ettr, run_terms

    measured = measured_ettr(run_dir)
    faults = read_events(run_dir, kinds={"fault_injected"})
    first_step = min(e["time"] for e in read_events(run_dir, kinds={"first_step"}))
    window = max(e["time"] for e in read_events(run_dir, kinds={"controller_done"})) - first_step
    return {"measured": measured, "terms": {**run_terms(measured), **restart_terms({"measured": measured})},
            "window_s": window,
            "kills": sum(e["kind"] == "kill" for e in faults), "nodes": sum(e["kind"] == "node" for e in faults)}


# ---- the parent: the simulator's prediction ---------------------------------------------------


def restart_terms(summary_: dict[str, Any]) -> dict[str, Optional[float]]:
    """A killed rank's restart when its node's warm spare was ready (the kill that struck the longest-trained
    attempt) and when it was not (the shortest): a replacement that must import torch takes longer here."""
    kills = sorted((r for r in summary_["measured"]["recoveries"] if r["cause"] == "dead worker" and not r["struck"]),
                   key=lambda r: r["since_s"])
    return {"restart_warm_s": kills[-1]["restart_s"] if kills else None,
            "restart_cold_s": kills[0]["restart_s"] if kills else None}


def simulator_terms(terms: dict[str, Any], kill_per_s: float, node_per_s: float) -> Any:
    """`RecoveryTerms` from calibrated terms. The simulator has one restart term for every path, and restarts here
    differ by path. A killed rank's restart: warm when its node's spare has had time to import torch since the
    attempt began to train, which takes about as long as a cold replacement's restart (W), so with faults at rate
    lambda it is cold with probability 1 - exp(-lambda W). The simulator gets the mean of that and a lost node's
    restart (its ranks all start again: always some cold) weighted by the rates, and a storage restore's longer
    restart (its trainers look in keeper and peer memory first) goes into its restore."""
    from phalanx.planner.goodput import RecoveryTerms

    warm, cold = terms["restart_warm_s"], terms["restart_cold_s"]
    total = kill_per_s + node_per_s
    process = warm + (cold - warm) * (1 - math.exp(-total * cold))
    restart = (kill_per_s * process + node_per_s * terms["restart_node_s"]) / total
    storage = terms["restore_storage_s"] + max(0.0, terms["restart_storage_s"] - restart)
    return RecoveryTerms(
        step_s=terms["step_s"], snapshot_s=terms["snapshot_s"], persist_s=terms["persist_s"],
        detect_process_s=terms["detect_process_s"], detect_node_s=terms["detect_node_s"], detect_hang_s=0.0,
        restart_s=restart, restore_keeper_s=terms["restore_keeper_s"], restore_peer_s=terms["restore_peer_s"],
        restore_storage_s=storage, replan_s=0.0, reshard_s=0.0, first_step_s=terms["first_step_s"],
        restart_job_s=restart)


def filled(terms: dict[str, Any], fallback: dict[str, Any]) -> dict[str, Any]:
    """`terms` with the ones its run had no recovery for taken from `fallback` (0 where neither had one)."""
    return {k: v if v is not None else (fallback.get(k) if fallback.get(k) is not None else 0.0)
            for k, v in terms.items()}


def predict(terms: dict[str, float], kill_per_s: float, node_per_s: float, steps: int, persist_every: int,
            nodes: int = 3) -> dict[str, Any]:
    """The simulator over SEEDS seeds for `steps` steps at these rates, the run's launch and final save added to each
    seed's wall time: mean ETTR, its 10th-90th percentile and the mean breakdown."""
    from phalanx.planner.goodput import FailureRates, simulate

    rates = FailureRates.from_cluster_rates(nodes, process_per_s=kill_per_s, node_per_s=node_per_s)
    sim_terms = simulator_terms(terms, kill_per_s, node_per_s)
    fixed = terms["startup_s"] + terms["end_s"]
    ettrs, breakdowns, failures = [], [], []
    for seed in range(SEEDS):
        out = simulate(sim_terms, rates, nodes=nodes, steps=steps, mode="spares", seed=seed,
                       persist_every=persist_every, snapshot_every=1, spares=10 ** 6, erasure_k=2, erasure_m=1)
        wall = out.wall_s + fixed
        ettrs.append(out.ettr * out.wall_s / wall)
        shares = {k: v * out.wall_s / wall for k, v in out.breakdown.items()}
        shares["startup"] = terms["startup_s"] / wall
        shares["persist"] += terms["end_s"] / wall
        breakdowns.append(shares)
        failures.append(out.failures)
    ordered = sorted(ettrs)
    return {"ettr": statistics.mean(ettrs), "p10": ordered[len(ordered) // 10], "p90": ordered[-len(ordered) // 10 - 1],
            "breakdown": {k: statistics.mean(b[k] for b in breakdowns) for k in breakdowns[0]},
            "failures": statistics.mean(failures)}


def compare(name: str, run: dict[str, Any], calibrated: dict[str, Any], kills: float, nodes: float,
            persist_every: int) -> dict[str, Any]:
    """Measured vs predicted with the calibrated terms at the drawn rates (the faults the run met over its fault
    window) — the acceptance; beside it the same with the run's own terms (what the model's structure misses, apart
    from the terms' drift between runs), and with the calibrated terms at the nominal rates."""
    measured, steps = run["measured"], run["measured"]["kept_steps"]
    window = max(run["window_s"], 1e-9)
    drawn = (max(run["kills"], 1e-9) / window, max(run["nodes"], 1e-9) / window)
    terms = filled(calibrated, run["terms"])
    predicted = predict(terms, *drawn, steps, persist_every)
    mine = filled(run["terms"], calibrated)
    # a run's own kills are not chosen warm and cold: their mean restart, whenever they struck
    mine.update(restart_warm_s=mine["restart_process_s"], restart_cold_s=mine["restart_process_s"])
    own = predict(mine, *drawn, steps, persist_every)
    nominal = predict(terms, kills / 60, nodes / 60, steps, persist_every)
    return {"rate": name, "measured": measured["ettr"], "predicted": predicted["ettr"],
            "diff_points": (predicted["ettr"] - measured["ettr"]) * 100, "own_terms": own["ettr"],
            "nominal": nominal["ettr"], "nominal_p10_p90": [nominal["p10"], nominal["p90"]],
            "faults": run["kills"] + run["nodes"], "kills": run["kills"], "node_losses": run["nodes"],
            "failures": measured["failures"], "steps": steps, "wall_s": measured["wall_s"],
            "measured_breakdown": measured["breakdown"], "predicted_breakdown": predicted["breakdown"],
            "own_breakdown": own["breakdown"], "run_terms": run["terms"], "recoveries": measured["recoveries"]}


def table(rows: list[dict[str, Any]]) -> str:
    keys = ("train", "snapshot", "persist", "detect", "restart", "restore", "lost", "startup")
    lines = [f"{'rate':<12} {'faults':>6} {'measured':>9} {'predicted':>9} {'diff pt':>8} {'own terms':>9} "
             f"{'nominal (p10-p90)':>20}"]
    for r in rows:
        lines.append(f"{r['rate']:<12} {r['faults']:>6} {r['measured'] * 100:>8.1f}% {r['predicted'] * 100:>8.1f}% "
                     f"{r['diff_points']:>+8.1f} {r['own_terms'] * 100:>8.1f}% {r['nominal'] * 100:>7.1f}% "
                     f"({r['nominal_p10_p90'][0] * 100:.0f}-{r['nominal_p10_p90'][1] * 100:.0f}%)")
    for r in rows:
        lines.append(f"  {r['rate']}: % of wall, measured / predicted / with the run's own terms:")
        lines.append("    " + "  ".join(f"{k} {r['measured_breakdown'][k] * 100:.1f}/"
                                        f"{r['predicted_breakdown'][k] * 100:.1f}/{r['own_breakdown'][k] * 100:.1f}"
                                        for k in keys))
        lines.append("    its own terms: " + terms_line(r["run_terms"]))
        lines.append("    its recoveries (cause, trained s before, restart s): " + ", ".join(
            f"{x['cause'].split()[-1]} {x['since_s']:.0f} {x['restart_s']:.1f}{'*' * x['struck']}"
            for x in r["recoveries"]) + " (*: a fault absorbed)")
    return "\n".join(lines)


def terms_line(terms: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in terms.items())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short run at one rate, terms from itself")
    parser.add_argument("--timeout", type=float, default=2700.0, help="seconds the runs may take")
    parser.add_argument("--keep", help="a folder to run in and keep (the runs' events, metrics and the child's log)")
    parser.add_argument("--again", help="compare again from a folder kept with --keep, without running")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.child:
        runs = child(plan, args.child)  # written only when every run finished
        with open(os.path.join(args.child, "goodput.json"), "w") as f:
            json.dump(runs, f)
        return 0
    loopback_env()
    if args.again:  # the comparison again, from runs kept with --keep
        runs = {name: summary(os.path.join(args.again, folder)) for name, folder in runs_of(plan).items()}
    else:
        runs = measure(args, plan)
    return report(plan, runs, args.quick)


def measure(args: argparse.Namespace, plan: dict) -> dict[str, Any]:
    """The runs, in a child process bounded by --timeout; their figures."""
    with tempfile.TemporaryDirectory(prefix="phalanx-goodput-") as temporary:
        root = args.keep or temporary
        os.makedirs(root, exist_ok=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", root, *(["--quick"] if args.quick else [])]
        folders = run_side(cmd, os.path.join(root, "goodput.json"), os.path.join(root, "child.log"),
                           args.timeout if not args.quick else min(args.timeout, 300.0), "goodput benchmark: the runs")
        return {name: summary(os.path.join(root, folder)) for name, folder in folders.items()}


def report(plan: dict, runs: dict[str, Any], quick: bool) -> int:
    """The comparison per rate, and the JSON line."""
    calibrated = runs.get("calibration")
    rows = []
    for name, kills, nodes, _, _ in plan["rates"]:
        terms = (calibrated or runs[name])["terms"]
        rows.append(compare(name, runs[name], terms, kills, nodes, plan["persist_every"]))
    terms = (calibrated or runs[plan["rates"][0][0]])["terms"]
    if calibrated:
        print(f"calibration run: {calibrated['kills']} kill, {calibrated['nodes']} node losses, measured ETTR "
              f"{calibrated['measured']['ettr'] * 100:.1f}%")
    print(f"\ngoodput under random kills and node losses: {plan['workers']} CPU workers on a {len(plan['cpus'])}-node "
          f"Ray cluster; {platform.machine()}, {os.cpu_count()} cores; terms from "
          f"{'the calibration run' if calibrated else 'the run itself (quick)'}:")
    print("  " + terms_line(terms))
    print(table(rows))
    worst = max(abs(r["diff_points"]) for r in rows)
    print(f"largest |measured - predicted| {worst:.1f} points (target <= 5)")
    fast = rows[-1]
    print(json.dumps({"speedup": round(fast["predicted"] / max(fast["measured"], 1e-9), 3),
                      "max_diff_points": round(worst, 2), "targets_met": worst <= 5, "terms": terms,
                      "rates": rows, "quick": quick}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
