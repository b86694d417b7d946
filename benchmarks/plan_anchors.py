"""The planner's predictions next to published throughput for the same setups (no GPU needed).

Each anchor is a run someone published with its layout; the planner costs that exact layout on a
preset topology and prints predicted tokens/s per GPU and memory beside the published figures.
The ratio is predicted / published. See docs/plan.md for what differs between the setups.

    .venv/bin/python benchmarks/plan_anchors.py [--skip-pick]
    .venv/bin/python benchmarks/plan_anchors.py --quick     # without the planner's own picks: checks it runs

Last line: JSON with every row and `speedup` = the geometric mean of predicted / published tokens/s/GPU over
the rows (each anchor without and with full activation checkpointing, which bracket the published runs'
selective AC): the planner's prediction against the published figure, 1.0 where they agree on average.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phalanx.config import load_config  # noqa: E402
from phalanx.parallel.layout import Layout  # noqa: E402
from phalanx.planner.cost import step_cost  # noqa: E402
from phalanx.planner.plan import plan  # noqa: E402
from phalanx.planner.topology import preset  # noqa: E402

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
LLAMA3_8B = ["model.vocab_size=128256", "model.d_model=4096", "model.n_layers=32", "model.n_heads=32",
             "model.n_kv_heads=8", "model.ffn_dim=14336", "model.max_seq_len=8192", "data.seq_len=8192",
             "model.rope_theta=500000", "train.dtype=bf16"]

# name, overrides, layout, topology, published tokens/s/GPU, published memory GiB (or None), source
ANCHORS = [
    ("Llama-3.1-8B, 8xH100, FSDP, local batch 2, selective AC (torchtitan docs/performance.md, Table 1)",
     [*LLAMA3_8B, "train.batch_size=16"], Layout(dp=8, dp_backend="fsdp", micro_batch_size=2),
     preset("H100", nodes=1, gpus_per_node=8), 5762, 82.4),
    ("Llama-3-8B, 64xA100, FSDP, local batch 1, selective op AC (torchtitan docs/performance.md)",
     [*LLAMA3_8B, "train.batch_size=64"], Layout(dp=64, dp_backend="fsdp", micro_batch_size=1),
     preset("A100", nodes=8, gpus_per_node=8, nic="hdr200"), 2973, None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-pick", action="store_true", help="skip the planner's own pick for each anchor "
                        "(a search over every layout: the slow part)")
    parser.add_argument("--quick", action="store_true", help="--skip-pick (the test suite's run)")
    args = parser.parse_args()
    skip_pick = args.skip_pick or args.quick
    rows = []
    for name, overrides, layout, topo, published, published_mem in ANCHORS:
        cfg = load_config(CONFIG, overrides)
        for ac in (False, True):
            cost = step_cost(cfg, layout.with_(activation_checkpointing=ac), topo)
            per_gpu = cost.tokens_per_s / layout.world
            rows.append({"anchor": name, "activation_checkpointing": ac, "published_tps_gpu": published,
                         "predicted_tps_gpu": round(per_gpu), "ratio": round(per_gpu / published, 3),
                         "predicted_mfu": round(cost.mfu, 3), "published_mem_gib": published_mem,
                         "predicted_mem_gib": round(cost.memory.total / 2**30, 1),
                         "predicted_exposed_comm_s": round(sum(cost.comm_s.values()), 4),
                         "predicted_step_s": round(cost.step_s, 3)})
            print(f"{name}\n  AC {'full' if ac else 'none'}: predicted {per_gpu:,.0f} tokens/s/GPU "
                  f"(MFU {cost.mfu:.1%}, {cost.memory.total / 2**30:.1f} GiB) vs published {published:,} "
                  f"-> {per_gpu / published:.2f}x")
        best = None if skip_pick else plan(cfg, topo).best
        if best is not None:
            print(f"  planner's own pick: {best.layout.name()} {best.tokens_per_s / layout.world:,.0f} tokens/s/GPU, "
                  f"{best.memory.total / 2**30:.1f} GiB")
    speedup = math.exp(statistics.mean(math.log(r["predicted_tps_gpu"] / r["published_tps_gpu"]) for r in rows))
    print(json.dumps({"anchors": rows, "speedup": round(speedup, 3)}))


if __name__ == "__main__":
    main()
