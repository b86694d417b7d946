"""`phalanx plan --failures`: the goodput recommendation for the planned layout, printed, plotted and written.

The decisions are `goodput.recommend`'s; this module turns arguments into its inputs and its answer into lines,
config overrides (`--write`) and a plot of ETTR against cluster size (`--plot`).
"""

from __future__ import annotations

import io
import math
from typing import Any, Optional

from phalanx.errors import ConfigError
from phalanx.planner.goodput import (GPU_CLUSTER, HOUR, LLAMA3_NODE_MTBF_HOURS, ClusterPreset, FailureRates,
                                     Recommendation, RecoveryTerms, recommend, terms_for)

LABELS = {"spares": "phalanx, warm spares", "elastic": "phalanx, elastic (no spares)",
          "checkpoint_restart": "checkpoint-restart from storage (anchor)"}
PLOT_NODES = (8, 32, 128, 512, 2048, 8192)


def add_failure_arguments(parser: Any) -> None:
    """The `--failures` options of `phalanx plan`."""
    llama3 = FailureRates.llama3()
    parser.add_argument("--failures", action="store_true", help="also recommend snapshot / persist intervals, "
                        "erasure k and m and spares, and predict each mode's effective training time")
    parser.add_argument("--mtbf-hours", type=float, default=LLAMA3_NODE_MTBF_HOURS, metavar="H",
                        help=f"mean hours between failures of one node (default {LLAMA3_NODE_MTBF_HOURS:.0f}: Llama 3)")
    parser.add_argument("--node-share", type=float, default=llama3.node_share,
                        help=f"share of failures that take the whole node (default {llama3.node_share})")
    parser.add_argument("--hang-share", type=float, default=llama3.hang_share,
                        help=f"share of failures that are hangs (default {llama3.hang_share})")
    parser.add_argument("--repair-hours", type=float, default=llama3.repair_hours,
                        help=f"hours a lost node stays out (default {llama3.repair_hours:g})")
    parser.add_argument("--days", type=float, default=30.0, help="simulated run length in failure-free days "
                        "(default 30)")
    parser.add_argument("--steps", type=int, default=None, help="simulated run length in steps (instead of --days)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated failures (default 0)")
    parser.add_argument("--terms", default=None, metavar="FILE", help="recovery terms saved by --failures "
                        "--calibrate, instead of the GPU-cluster preset")
    parser.add_argument("--plot", default=None, metavar="FILE", help="with --failures: plot ETTR against cluster "
                        "size for each mode (PNG)")


def rates_from_args(args: Any) -> FailureRates:
    """The failure rates the arguments describe (errors name the flag)."""
    return FailureRates(node_mtbf_hours=args.mtbf_hours, node_share=args.node_share, hang_share=args.hang_share,
                        repair_hours=args.repair_hours)


def run_steps(args: Any, step_s: float) -> int:
    if args.steps is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps={args.steps} must be a positive integer")
        return args.steps
    if not args.days > 0:
        raise ConfigError(f"--days={args.days} must be > 0")
    return max(1, round(args.days * 86400 / step_s))


def recommend_for(cfg: Any, best: Any, topo: Any, args: Any, preset: ClusterPreset = GPU_CLUSTER,
                  terms: Optional[RecoveryTerms] = None) -> tuple[RecoveryTerms, FailureRates, Recommendation]:
    """Terms of the planned layout (or the given ones), the rates, and the recommendation for `topo.nodes`."""
    rates = rates_from_args(args)
    if terms is None:
        terms = terms_for(cfg, best, topo, preset)
    steps = run_steps(args, terms.step_s)
    rec = recommend(terms, rates, nodes=topo.nodes, steps=steps, seed=args.seed)
    if best is not None and rec.erasure_k != cfg.checkpoint.erasure_k and args.terms is None:
        terms = terms_for(cfg, best, topo, preset, erasure_k=rec.erasure_k)  # a rebuild reads k blocks
        rec = recommend(terms, rates, nodes=topo.nodes, steps=steps, seed=args.seed)
    return terms, rates, rec


def _duration(seconds: float) -> str:
    if seconds >= HOUR:
        return f"{seconds / HOUR:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.3g} s"


def format_failures(terms: RecoveryTerms, rates: FailureRates, rec: Recommendation, nodes: int, source: str,
                    seed: int = 0) -> str:
    """The recommendation and each mode's prediction as lines."""
    out = io.StringIO()
    system = rates.node_mtbf_hours * HOUR / nodes
    out.write(f"\nfailures: one node every {rates.node_mtbf_hours:,.0f} h ({rates.node_share:.0%} take the node, "
              f"{rates.hang_share:.0%} hang, {rates.process_share:.0%} kill a process; a lost node is out "
              f"{rates.repair_hours:g} h): on {nodes} nodes one every {_duration(system)}\n")
    out.write(f"recovery terms ({source}): step {terms.step_s:.4g} s, snapshot {terms.snapshot_s * 1e3:.3g} ms "
              f"+ copy {terms.snapshot_copy_s:.3g} s, detect {terms.detect_process_s:.3g} / {terms.detect_node_s:.3g} "
              f"/ {terms.detect_hang_s:.3g} s (process / node / hang), restart {terms.restart_s:.3g} s, restore keeper "
              f"{terms.restore_keeper_s:.3g} / peers {terms.restore_peer_s:.3g} / storage {terms.restore_storage_s:.3g}"
              f" s, elastic replan {terms.replan_s:.3g} + reshard {terms.reshard_s:.3g} s, job requeue "
              f"{terms.restart_job_s:.3g} s\n")
    span = rec.steps * terms.step_s
    every = rec.snapshot_every * terms.step_s
    out.write(f"recommended: snapshot every {rec.snapshot_every} steps ({_duration(every)}),"
              f" persist every {rec.persist_every} steps ({_duration(rec.persist_every * terms.step_s)}), erasure "
              f"k={rec.erasure_k} m={rec.erasure_m} (a group loses more than m nodes between two persists: "
              f"p={rec.group_loss_p:.1e}), {rec.spares} warm spares ({rec.spares / nodes:.1%} of the nodes)\n")
    out.write(f"predicted over {rec.steps:,} steps ({_duration(span)} failure-free), seed {seed}:\n")
    out.write(f"  {'mode':<58} {'ETTR':>6} {'failures':>8}  lost to: "
              + " ".join(k for k in ("snapshot", "persist", "detect", "restart", "restore", "wait", "lost", "shrunk"))
              + "\n")
    for mode, o in rec.outcomes.items():
        label = LABELS[mode] + (f", every {rec.checkpoint_every} steps" if mode == "checkpoint_restart" else "")
        parts = " ".join(f"{o.breakdown[k]:.2%}" for k in ("snapshot", "persist", "detect", "restart", "restore",
                                                             "wait", "lost", "shrunk"))
        out.write(f"  {label:<58} {o.ettr:>6.1%} {o.failures:>8}  {parts}\n")
    return out.getvalue()


def overrides(rec: Recommendation) -> list[str]:
    """The recommendation as config overrides (fields the checkpoint engine reads)."""
    return [f"checkpoint.snapshot_every={rec.snapshot_every}", f"checkpoint.persist_every={rec.persist_every}",
            f"checkpoint.erasure_k={rec.erasure_k}", f"checkpoint.erasure_m={rec.erasure_m}"]


def plot_ettr(terms: RecoveryTerms, rates: FailureRates, path: str, steps: int, seed: int, nodes: int) -> str:
    """ETTR against cluster size for each mode (the layout's terms per rank held, the failure rate growing)."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plot draws with matplotlib, which is not installed; install it with "
                          "`pip install matplotlib` or drop --plot") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({*PLOT_NODES, nodes})
    series: dict[str, list[float]] = {}
    for n in sizes:
        for mode, o in recommend(terms, rates, nodes=n, steps=steps, seed=seed).outcomes.items():
            series.setdefault(mode, []).append(o.ettr)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, values in series.items():
        ax.plot(sizes, [100 * v for v in values], marker="o", label=LABELS[mode])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("nodes")
    ax.set_ylabel("effective training time (%)")
    ax.set_title(f"ETTR vs cluster size (node MTBF {rates.node_mtbf_hours:,.0f} h, step {terms.step_s:.3g} s)")
    ax.axvline(nodes, color="grey", linestyle=":", linewidth=1)
    ax.grid(True, alpha=0.3)
    ax.legend()
    low = min(min(v) for v in series.values())
    ax.set_ylim(max(0.0, math.floor(100 * low) - 2), 100.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
