"""The planner against measurement: predicted vs measured step time of every CPU layout, and whether
the recommended layout is (within 10% of) the fastest one measured.

For 2 and 4 gloo ranks on this machine: calibrate (`phalanx plan --calibrate`'s micro-benchmarks,
all ranks at once; once per round, each figure taken from its least disturbed round), cost the grid of dense layouts phalanx runs on CPU (dp / sp / pp mixes over ddp
and fsdp), then measure each with the real trainer (fastest step of the timed steps over rounds, slowest rank).
Prints one line per layout and, last, a JSON line:
`{"max_abs_error": .., "recommended_vs_best": measured(recommended) / measured(best), "speedup": .., ...}`,
where `speedup` = measured(best) / measured(recommended) at the worst world, the step time of the planner's pick
against the fastest layout measured (the anchor): at most 1, and 1.0 when the planner picked the fastest.

    .venv/bin/python benchmarks/plan.py [--steps 5] [--worlds 2 4] [--rounds 3] [--topology-out PREFIX]
    .venv/bin/python benchmarks/plan.py --quick     # one rank in-process, one round of 3 steps: checks it runs
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phalanx.config import load_config  # noqa: E402
from phalanx.parallel.layout import Layout  # noqa: E402
from phalanx.planner.calibrate import calibrate_local  # noqa: E402
from phalanx.planner.measure import measure_layout  # noqa: E402
from phalanx.planner.plan import plan, valid  # noqa: E402
from phalanx.planner.topology import Topology  # noqa: E402

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
# configs/tiny.yaml's model (4 blocks, d=128, 4 heads) at 128 tokens, 16 sequences per step
BASE = ["train.batch_size=16", "train.micro_batch_size=4", "train.eval_every=0", "log.wandb=disabled",
        "log.progress=none", "data.seq_len=128"]
# --quick: one rank (calibration and the one dense layout run in this process), one round, a smaller model;
# not a result.
QUICK = {"worlds": [1], "rounds": 1, "steps": 3,
         "overrides": ["model.d_model=64", "model.n_layers=2", "data.seq_len=32", "model.max_seq_len=32"]}


def grid(world: int, base: list[str] = BASE) -> list[Layout]:
    """The dense CPU layouts of `world` ranks: every dp/sp/pp factorisation with ddp, fsdp where there is no
    pipeline, and 1F1B (GPipe too on 2 ranks); 16 sequences of 128 tokens per step."""
    cfg = load_config(CONFIG, base)
    out = []
    for pp in (1, 2, 4):
        for sp in (1, 2, 4):
            if world % (pp * sp):
                continue
            dp = world // (pp * sp)
            backends = ["ddp", "fsdp"] if dp * sp > 1 and pp == 1 else ["ddp"]
            schedules = ["1f1b", "gpipe"] if pp > 1 and world == 2 else ["1f1b"]
            for backend in backends:
                for schedule in schedules:
                    mb = 16 // dp // max(pp, 2) if pp > 1 else min(4, 16 // dp)  # pp: at least pp micro-batches
                    lay = Layout(dp=dp, sp=sp, pp=pp, dp_backend=backend, pp_schedule=schedule, micro_batch_size=mb)
                    if valid(cfg, lay):
                        out.append(lay)
    return out


def least_disturbed(topos: list[Topology], microbatch_flops: float) -> Topology:
    """Each calibrated figure at its least disturbed round, as the measured side takes each layout's fastest
    step: on a shared machine other work only ever adds time. Rate and fixed cost come from one round (they are
    one line), the one whose micro-batch is fastest; contention as the fastest time of a micro-batch with j ranks
    busy over the fastest alone; every other figure is its round's best."""
    def solo(t: Topology) -> float:
        return t.microbatch_overhead_s + microbatch_flops / (t.peak_flops * t.achieved)

    best = min(topos, key=solo)
    link = min((t.intra for t in topos), key=lambda link: link.time(1 << 20))
    copy = min((t.copy for t in topos), key=lambda link: link.time(1 << 20))
    width = max(len(t.contention) for t in topos)
    busy = [min(solo(t) * t.contention[j] for t in topos if len(t.contention) > j) for j in range(width)]
    return replace(best, intra=link, inter=link, copy=copy, contention=tuple(max(1.0, b / solo(best)) for b in busy),
                   optimizer_bytes_per_s=max(t.optimizer_bytes_per_s for t in topos),
                   fsdp_call_s=min(t.fsdp_call_s for t in topos), fsdp_param_s=min(t.fsdp_param_s for t in topos),
                   sync_s=min(t.sync_s for t in topos))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--topology-out", default=None, help="save each world's least disturbed calibration here")
    parser.add_argument("--quick", action="store_true", help="one rank, one round of 3 steps, a smaller model "
                        "(the test suite's run)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every layout, e.g. model.n_layers=2")
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    base = [*BASE, *args.overrides]
    cfg = load_config(CONFIG, base)
    summary: dict = {"worlds": {}}
    errors = []
    for world in args.worlds:
        layouts = grid(world, base)
        measured: dict = {}
        topos = []
        for _ in range(args.rounds):  # rounds interleave calibration and layouts: a burst of other load hits all alike
            topos.append(calibrate_local(cfg, world))
            for lay in layouts:
                ranks = measure_layout(CONFIG, base + lay.to_overrides(), world, steps=args.steps)
                # a step ends when its slowest rank does; the fastest step is the one least disturbed by other
                # work on this shared machine (calibration takes minima too)
                step = min(max(r["seconds"][i] for r in ranks) for i in range(1, args.steps))
                measured[lay] = min(measured.get(lay, step), step)
        from phalanx.models import flops_per_token

        topo = least_disturbed(topos, cfg.train.micro_batch_size * cfg.data.seq_len *
                               flops_per_token(cfg.model, cfg.data.seq_len))
        if args.topology_out:
            from phalanx.planner.topology import save_topology

            save_topology(topo, f"{args.topology_out}.{world}.json")
        predicted = {c.layout: c for c in plan(cfg, topo, refine=0, layouts=layouts).rows}
        for lay in layouts:
            ratio = predicted[lay].step_s / measured[lay]
            errors.append(abs(ratio - 1))
            print(f"world {world}  {lay.name():<28} predicted {predicted[lay].step_s * 1e3:8.1f} ms  "
                  f"measured {measured[lay] * 1e3:8.1f} ms  predicted/measured {ratio:.2f}", flush=True)
        recommended = min(layouts, key=lambda lay: predicted[lay].step_s)
        best = min(layouts, key=lambda lay: measured[lay])
        rec_vs_best = measured[recommended] / measured[best]
        print(f"world {world}: recommended {recommended.name()} measured {measured[recommended] * 1e3:.1f} ms; "
              f"best measured {best.name()} {measured[best] * 1e3:.1f} ms; ratio {rec_vs_best:.3f}", flush=True)
        summary["worlds"][world] = {
            "recommended": recommended.name(), "best": best.name(), "recommended_vs_best": round(rec_vs_best, 3),
            "layouts": {lay.name(): {"predicted_ms": round(predicted[lay].step_s * 1e3, 1),
                                     "measured_ms": round(measured[lay] * 1e3, 1)} for lay in layouts},
            "calibration": {"flops": round(topo.peak_flops * topo.achieved), "microbatch_overhead_ms":
                            round(topo.microbatch_overhead_s * 1e3, 2), "link_GBps": round(topo.intra.bandwidth / 1e9, 3),
                            "link_latency_us": round(topo.intra.latency_s * 1e6, 1),
                            "contention": [round(c, 2) for c in topo.contention],
                            "copy_GBps": round(topo.copy.bandwidth / 1e9, 2),
                            "fsdp_call_ms": round(topo.fsdp_call_s * 1e3, 3),
                            "fsdp_param_us": round(topo.fsdp_param_s * 1e6, 1),
                            "sync_ms": round(topo.sync_s * 1e3, 3)},
        }
    summary["max_abs_error"] = round(max(errors), 3)
    summary["within_25pct"] = sum(e <= 0.25 for e in errors)
    summary["layouts"] = len(errors)
    summary["recommended_vs_best"] = max(w["recommended_vs_best"] for w in summary["worlds"].values())
    summary["speedup"] = round(1 / summary["recommended_vs_best"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
