"""`phalanx plan`: every valid layout of a config on a cluster, costed, ranked, and the best one written.

Layouts are every (pp, sp, dp, ep) factorisation of the world, each data-parallel back end that
composes with it, pipeline schedules, micro-batch sizes and activation checkpointing; `validate()`
(the same check `phalanx train` runs) decides what is valid. Each is costed with phalanx's rank
order, then the fastest that fit are re-costed with their best placement and re-ranked.
"""

from __future__ import annotations

import copy
import io
import itertools
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from phalanx.errors import ConfigError
from phalanx.parallel.layout import Layout
from phalanx.planner.cost import StepCost, step_cost
from phalanx.planner.placement import best_order
from phalanx.planner.topology import Topology


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: Any, world: int) -> Iterator[Layout]:
    """Layouts worth costing (before validation): degrees, back ends, schedules, micro-batches, AC."""
    m, t = cfg.model, cfg.train
    experts = m.moe.num_experts
    for pp in _divisors(world):
        if pp > m.n_layers or (pp > 1 and m.tie_embeddings):
            continue
        for sp in _divisors(world // pp):
            if cfg.data.seq_len % sp or m.n_heads % sp:
                continue
            dp = world // (pp * sp)
            if t.batch_size % dp:
                continue
            per_rank = t.batch_size // dp
            eps = [e for e in _divisors(dp * sp) if experts and experts % e == 0] or [1]
            backends = [("ddp", 1)] if dp * sp == 1 else [("ddp", 1), ("fsdp", 1), ("zero", 1), ("zero", 2), ("zero", 3)]
            schedules = [("1f1b", 2)] if pp == 1 else [("1f1b", 2), ("gpipe", 2), ("interleaved", 2)]
            micro = [b for b in _divisors(per_rank) if b & (b - 1) == 0] or [per_rank]
            # activation checkpointing: train.activation_checkpointing none or full
            for ep, (backend, stage), (schedule, virtual), mb, ac in itertools.product(
                    eps, backends, schedules, micro, (False, True)):
                yield Layout(dp=dp, sp=sp, ep=ep, pp=pp, dp_backend=backend, zero_stage=stage, pp_schedule=schedule,
                             pp_virtual_stages=virtual, microbatches="auto", micro_batch_size=mb,
                             activation_checkpointing=ac)


def valid(cfg: Any, layout: Layout) -> bool:
    from phalanx.parallel import validate

    trial = layout.apply(cfg)
    trial.data.kind, trial.data.path = "synthetic", None  # the plan needs no data file
    try:
        validate(trial, layout.world)
    except ConfigError:
        return False
    return True


@dataclass
class Plan:
    rows: list[StepCost]  # ranked: layouts that fit first, fastest first
    considered: int
    topology: Topology

    @property
    def best(self) -> Optional[StepCost]:
        return self.rows[0] if self.rows and self.rows[0].fits else None


def plan(cfg: Any, topo: Topology, refine: int = 32, layouts: Optional[list[Layout]] = None) -> Plan:
    """Cost every valid layout on `topo`; the `refine` best are re-costed with their best rank order."""
    world = topo.world
    cfg = copy.deepcopy(cfg)
    candidates = layouts if layouts is not None else [lay for lay in candidate_layouts(cfg, world) if valid(cfg, lay)]
    if not candidates:
        raise ConfigError(f"no valid layout of this config on {topo.nodes} x {topo.gpus_per_node} devices; check that "
                          f"train.batch_size({cfg.train.batch_size}) is a multiple of the data-parallel degree")
    costs = [step_cost(cfg, lay, topo) for lay in candidates]
    costs.sort(key=lambda c: (not c.fits, c.step_s))
    head = []
    for c in costs[:refine]:
        placed = c.layout.with_(order=best_order(cfg, c.layout, topo))
        head.append(step_cost(cfg, placed, topo) if placed != c.layout else c)
    rows = sorted(head, key=lambda c: (not c.fits, c.step_s)) + costs[refine:]
    return Plan(rows, len(candidates), topo)


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def _bytes(b: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.1f}{unit}"
    return f"{b}B"


def format_table(p: Plan, top: int) -> str:
    """The ranked layouts as a fixed-width table, then the recommendation."""
    out = io.StringIO()
    t = p.topology
    # A CPU has no honest peak to divide by (the trainer prints n/a too).
    mfu = (lambda c: "n/a") if t.device == "cpu" else (lambda c: f"{c.mfu * 100:.1f}%")
    out.write(f"{p.considered} valid layouts on {t.nodes} x {t.gpus_per_node} {t.device}"
              f"{' (calibrated)' if t.calibrated else ' (preset)'}; best {min(top, len(p.rows))}:\n")
    header = (f"{'#':>3}  {'layout':<34} {'order':<9} {'mem/dev GiB':>11} {'fits':>4} {'step s':>9} "
              f"{'tokens/s':>11} {'MFU':>6}  bytes/step per dim")
    out.write(header + "\n")
    for i, c in enumerate(p.rows[:top], 1):
        dims = " ".join(f"{d}={_bytes(b)}" for d, b in sorted(c.bytes_per_dim.items()))
        out.write(f"{i:>3}  {c.layout.name():<34} {','.join(c.layout.order):<9} {_gib(c.memory.total):>11} "
                  f"{'yes' if c.fits else 'no':>4} {c.step_s:>9.4g} {c.tokens_per_s:>11,.0f} {mfu(c):>6}  "
                  f"{dims or '-'}\n")
    best = p.best
    if best is None:
        out.write("no layout fits in device memory; add devices, shorten data.seq_len or shrink the model\n")
    else:
        out.write(f"recommended: {best.layout.name()} (order {','.join(best.layout.order)}): "
                  f"{best.step_s:.4g} s/step, {best.tokens_per_s:,.0f} tokens/s, {_gib(best.memory.total)} GiB/device; compute "
                  f"{best.compute_s:.3g} s, bubble {best.bubble:.0%}, exposed comm {sum(best.comm_s.values()):.3g} s\n")
    return out.getvalue()


def write_config(config_path: str, best: StepCost, out_path: str, force: bool = False,
                 extra: Optional[list[str]] = None) -> str:
    """`config_path` with its parallel section (and train.micro_batch_size) replaced by `best`'s, and the `extra`
    overrides (`--failures`: checkpoint intervals and erasure code), at `out_path`."""
    import os

    from omegaconf import OmegaConf

    if os.path.exists(out_path) and not force:
        raise ConfigError(f"'{out_path}' exists; pass --force to replace it or --write OTHER_PATH")
    original = OmegaConf.load(config_path)
    lay = best.layout
    merged = OmegaConf.merge(original, OmegaConf.from_dotlist([*lay.to_overrides(), *(extra or [])]))
    header = (f"# written by `phalanx plan {config_path}`: {lay.name()}, order {','.join(lay.order)}, predicted "
              f"{best.step_s:.4g} s/step, {best.tokens_per_s:,.0f} tokens/s\n")
    with open(out_path, "w") as f:
        f.write(header + OmegaConf.to_yaml(merged))
    return out_path


def add_plan_arguments(parser: Any) -> None:
    import argparse

    from phalanx.planner.failures_report import add_failure_arguments

    parser.add_argument("config", help="YAML config file, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.batch_size=512")
    parser.add_argument("--nodes", type=int, default=1, help="nodes in the cluster (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="devices per node (default 8)")
    parser.add_argument("--top", type=int, default=10, help="rows of the table (default 10)")
    parser.add_argument("--device", default=None, help="preset: H100, H200, A100, L40S or cpu (default H100, "
                                                       "or cpu with --calibrate)")
    parser.add_argument("--nic", default="ndr400", help="inter-node link per device: ndr400, hdr200, eth100, eth25")
    parser.add_argument("--topology", default=None, help="a saved topology JSON (from --calibrate) instead of a preset")
    parser.add_argument("--calibrate", action="store_true", help="measure compute and links with micro-benchmarks "
                        "on --gpus-per-node local processes (or every rank under torchrun), save to --topology")
    parser.add_argument("--write", nargs="?", const="", default=None, metavar="PATH",
                        help="write the config with the recommended parallel section (default CONFIG.plan.yaml)")
    parser.add_argument("--force", action="store_true", help="with --write: replace an existing file")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    add_failure_arguments(parser)


def _positive_arg(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name}={value} must be a positive integer")


def plan_command(args: Any) -> int:
    """`phalanx plan`: load, (calibrate,) plan, print, (write)."""
    import os
    import time

    from phalanx.config import load_config
    from phalanx.planner.topology import load_topology, preset, save_topology

    start = time.perf_counter()
    _positive_arg("--nodes", args.nodes)
    _positive_arg("--gpus-per-node", args.gpus_per_node)
    _positive_arg("--top", args.top)
    cfg = load_config(args.config, args.overrides)
    if args.calibrate:
        topo = _calibrate(cfg, args)
        path = args.topology or os.path.join(cfg.run.dir, "topology.json")
        save_topology(topo, path)
        print(f"calibrated {topo.nodes} x {topo.gpus_per_node} {topo.device}: {topo.peak_flops * topo.achieved:.3g} "
              f"FLOP/s achieved, {topo.microbatch_overhead_s * 1e3:.2f} ms fixed per micro-batch, intra "
              f"{topo.intra.bandwidth / 1e9:.2f} GB/s + {topo.intra.latency_s * 1e6:.0f} us, inter "
              f"{topo.inter.bandwidth / 1e9:.2f} GB/s + {topo.inter.latency_s * 1e6:.0f} us; slow-down with 1..n ranks "
              f"busy {'/'.join(f'{c:.2f}' for c in topo.contention) or '-'}, copies {topo.copy.bandwidth / 1e9:.1f} GB/s, "
              f"wait {topo.sync_s * 1e3:.2f} ms per sp/ep collective, FSDP {topo.fsdp_call_s * 1e3:.2f} ms per "
              f"collective + {topo.fsdp_param_s * 1e6:.0f} us per sharded parameter -> {path}")
        topo = topo.resized(args.nodes, args.gpus_per_node)
    elif args.topology:
        topo = load_topology(args.topology, args.nodes, args.gpus_per_node)
    else:
        topo = preset(args.device or "H100", args.nic, args.nodes, args.gpus_per_node, cfg.train.dtype)
    searched = time.perf_counter()
    result = plan(cfg, topo)
    print(format_table(result, args.top), end="")
    extra = _failures(cfg, args, result, topo, time.perf_counter() - searched) if args.failures else []
    if args.write is not None and result.best is not None:
        out = args.write or os.path.splitext(args.config)[0] + ".plan.yaml"
        print(f"wrote {write_config(args.config, result.best, out, args.force, extra)}")
    print(f"planned in {time.perf_counter() - start:.1f} s")
    return 0


def _failures(cfg: Any, args: Any, result: Plan, topo: Topology, replan_s: float) -> list[str]:
    """`--failures`: print the goodput recommendation for the best layout; its config overrides for --write."""
    import os

    from dataclasses import replace

    from phalanx.planner import failures_report as report
    from phalanx.planner.goodput import GPU_CLUSTER

    rates = report.rates_from_args(args)  # bad rates are refused before anything is measured
    if result.best is None and args.terms is None:
        raise ConfigError("--failures needs a layout that fits; add devices (--nodes / --gpus-per-node), shorten "
                          "data.seq_len or shrink the model")
    terms, source = None, f"preset '{GPU_CLUSTER.name}'"
    preset = replace(GPU_CLUSTER, replan_s=replan_s)  # the controller replans with this same search
    if args.terms:
        from phalanx.planner.calibrate_failures import load_terms

        terms, source = load_terms(args.terms), f"from {args.terms}"
    elif args.calibrate:
        from phalanx.planner.calibrate_failures import calibrate_failures, save_terms
        from phalanx.planner.goodput import terms_for

        preset = calibrate_failures(cfg, replan_s)
        path = save_terms(terms_for(cfg, result.best, topo, preset), os.path.join(cfg.run.dir, "recovery_terms.json"))
        source = f"calibrated on this machine, saved to {path}"
    terms, rates, rec = report.recommend_for(cfg, result.best, topo, args, preset, terms)
    print(report.format_failures(terms, rates, rec, topo.nodes, source, args.seed), end="")
    if args.plot:
        print(f"plotted {report.plot_ettr(terms, rates, args.plot, rec.steps, args.seed, topo.nodes)}")
    return report.overrides(rec)


def _calibrate(cfg: Any, args: Any) -> Topology:
    import os

    from phalanx.planner.calibrate import calibrate_local, calibrate_rank

    device = args.device or "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: every rank measures, across nodes too
        import torch.distributed as dist

        dist.init_process_group("nccl" if device != "cpu" else "gloo")
        try:
            return calibrate_rank(cfg, args.nodes, args.gpus_per_node, device)
        finally:
            dist.destroy_process_group()
    if args.nodes > 1:
        raise ConfigError(f"--calibrate with --nodes={args.nodes} measures this machine only; run it under torchrun "
                          f"on every node, or calibrate with --nodes=1 and plan for more nodes with --topology")
    return calibrate_local(cfg, args.gpus_per_node, device)
