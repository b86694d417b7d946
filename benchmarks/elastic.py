"""Elastic runs, one invocation: (1) resharding load time: phalanx reading another layout's keeper blocks
(`checkpoint/reshard.py`) against DCP's own load of the same state, one process; (2) node loss: the time from
losing one of three workers' machines to the first step on the two left, phalanx's elastic `phalanx ray` against
Ray Train's elastic training and torchft's replica-group drop (benchmarks/parts/node_loss.py).

    .venv/bin/python benchmarks/elastic.py [--d-model 512] [--layers 8] [--old-ranks 4] [--repeats 5]
                                           [--steps 60] [--loss-step 6] [overrides ...]
    .venv/bin/python benchmarks/elastic.py --quick     # the tests' tiny GPT: checks it runs

(1) The state is a GPT's (phalanx's model class) with AdamW's moments, as a trainer saves it. Layout A is
`--old-ranks` FSDP-style ranks: every tensor's rows split over them. Each old rank's share is packed into a
keeper block exactly as a snapshot packs it (`flat.FlatLayout`, global names and offsets), and the same state is
written by `torch.distributed.checkpoint.save` to local disk (read once before timing, so both read memory).
Layout B is one process holding the whole state. Timed, best of `--repeats`:

  phalanx   `reshard.reshard(template, layouts, fetch)`: DCP's load planner over the blocks (metadata from
            the old ranks' layouts, each block fetched once);
  anchor    `torch.distributed.checkpoint.load(template, checkpoint_id=DIR)`.

Both fill the same template and are checked equal. speedup = anchor / phalanx; the issue's target is a
reshard no slower than 1.2x DCP's load (speedup >= 0.83).

(2) Each side in its own child process (and Ray cluster), bounded by --timeout; configs/tiny.yaml with a global
batch of 6 (micro-batch 1). Its anchors are the `bench` extra (ray[train], torchft); without them this half says
so on stderr and is left out. Downtime runs from the node's removal (phalanx, Ray Train: `Cluster.remove_node`;
torchft: SIGKILL of the replica's process) to the end of the first step after it; the phases of phalanx and
Ray Train as benchmarks/recovery.py splits them. Targets (issue 16): Ray Train / phalanx >= 5, phalanx <= 10 s.

Last line: JSON with `speedup` (the reshard's), both load times, bytes and the layout, and `node_loss` (each
side's downtime and phases, the ratios) or null.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def build_state(d_model: int, layers: int) -> dict[str, Any]:
    """A trainer-shaped state of a GPT: weights, AdamW moments and step, schedule and data position."""
    import torch

    from phalanx.config import load_config
    from phalanx.models import build_on_meta, materialize

    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                      [f"model.d_model={d_model}", f"model.n_layers={layers}", "model.n_heads=8", "model.n_kv_heads=4"])
    model = materialize(build_on_meta(cfg.model), torch.device("cpu"), seed=0)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    optim = {name: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(w), "exp_avg_sq": torch.rand_like(w)}
             for name, w in weights.items()}
    return {"model": weights, "optim": {"state": optim}, "step": 10, "data": {"consumed": 160, "batch_size": 16}}


def old_blocks(state: dict[str, Any], ranks: int) -> tuple[dict[int, Any], dict[int, Any]]:
    """Each old rank's block and layout: every tensor's rows split over `ranks` (the last row-chunk may be short,
    a tensor with fewer rows than ranks goes whole to rank 0), packed as a snapshot packs them."""
    import torch
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    from phalanx.checkpoint.flat import ALIGN, FlatLayout, LeafMeta, dtype_name

    flat, mapping = flatten_state_dict(state)
    shares: dict[int, list[tuple[str, torch.Tensor, int]]] = {r: [] for r in range(ranks)}
    for fqn, value in flat.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.dim() == 0 or value.shape[0] < ranks:
            shares[0].append((fqn, value, 0))
            continue
        rows = -(-value.shape[0] // ranks)
        for r in range(ranks):
            if r * rows < value.shape[0]:
                shares[r].append((fqn, value[r * rows: (r + 1) * rows], r * rows))
    layouts, blocks = {}, {}
    values = {fqn: v for fqn, v in flat.items() if not isinstance(v, torch.Tensor)}
    for r, share in shares.items():
        leaves, offset = [], 0
        for fqn, chunk, row in share:
            nbytes = chunk.numel() * chunk.element_size()
            full = flat[fqn]
            leaves.append(LeafMeta(fqn, dtype_name(chunk.dtype), list(chunk.shape), offset, nbytes, list(full.shape),
                                   [row] + [0] * (full.dim() - 1) if full.dim() else []))
            offset += -(-nbytes // ALIGN) * ALIGN
        layout = FlatLayout(leaves, 64 * 1024)
        block = torch.zeros(layout.nbytes, dtype=torch.uint8)
        skeleton = {**values, **{fqn: chunk for fqn, chunk, _ in share}}
        from torch.distributed.checkpoint._nested_dict import unflatten_state_dict

        layout.pack(block, unflatten_state_dict(skeleton, {k: mapping[k] for k in skeleton}))
        layouts[r], blocks[r] = layout, block
    return layouts, blocks


def template_of(state: dict[str, Any]) -> dict[str, Any]:
    import torch

    def empty(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.empty_like(value)
        if isinstance(value, dict):
            return {k: empty(v) for k, v in value.items()}
        return value

    return empty(state)


def assert_equal(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
    import torch

    for key, value in want.items():
        if isinstance(value, dict):
            assert_equal(got[key], value, f"{where}.{key}")
        elif isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), f"{where}.{key} differs"
        else:
            assert got[key] == value, f"{where}.{key}: {got[key]!r} != {value!r}"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as dcp

    from phalanx.checkpoint.reshard import reshard

    torch.set_num_threads(1)
    state = build_state(args.d_model, args.layers)
    layouts, blocks = old_blocks(state, args.old_ranks)
    nbytes = sum(layout.tensor_bytes for layout in layouts.values())
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        dcp.save(state, checkpoint_id=folder, no_dist=True)
        dcp.load(template_of(state), checkpoint_id=folder, no_dist=True)  # its files now in the page cache
        phalanx_s, anchor_s = [], []
        for _ in range(args.repeats):
            template = template_of(state)
            start = time.perf_counter()
            loaded, read = reshard(template, layouts, blocks.__getitem__, ())
            phalanx_s.append(time.perf_counter() - start)
            assert_equal(loaded, state, "reshard")
            template = template_of(state)
            start = time.perf_counter()
            dcp.load(template, checkpoint_id=folder, no_dist=True)
            anchor_s.append(time.perf_counter() - start)
            assert_equal(template, state, "dcp")
    assert read == sorted(layouts), read
    return {"phalanx_s": min(phalanx_s), "anchor_s": min(anchor_s), "bytes": nbytes}


QUICK_RUN = ["model.d_model=64", "model.n_layers=2", "model.max_seq_len=32", "data.seq_len=32"]
RUN = ["log.wandb=disabled", "log.progress=none", "train.eval_every=0", "train.batch_size=6",
       "train.micro_batch_size=1"]
SIDES = ("phalanx", "raytrain", "torchft")


def anchors_missing() -> Optional[str]:
    try:
        import ray.train  # noqa: F401
        import torchft  # noqa: F401
    except ImportError as err:
        return str(err)
    return None


def child(side: str, args: argparse.Namespace, root: str) -> dict[str, Any]:
    """One side of the node-loss half in its own process, bounded by --timeout (its process group is killed)."""
    from benchmarks.recovery import run_side

    folder = os.path.join(root, side)
    os.makedirs(folder)
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--root", folder, "--config", args.config,
           "--steps", str(args.steps), "--loss-step", str(args.loss_step), "--timeout", str(args.timeout),
           *args.overrides]
    return run_side(cmd, os.path.join(folder, "result.json"), os.path.join(folder, "side.log"), args.timeout + 60,
                    f"elastic benchmark: the {side} side")


def node_loss(args: argparse.Namespace) -> Optional[dict[str, Any]]:
    missing = anchors_missing()
    if missing:
        print(f"elastic benchmark: node-loss half left out: its anchors need Ray Train and torchft ({missing}); "
              f"install the bench extra: pip install -e '.[bench]'", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory(prefix="phalanx-elastic-") as root:
        sides = {}
        for side in SIDES:
            started = time.time()
            sides[side] = child(side, args, root)
            print(f"{side}: downtime {sides[side]['downtime_s']:.2f}s (whole run {time.time() - started:.0f}s)",
                  flush=True)
    phalanx = sides["phalanx"]["downtime_s"]
    return {**sides, "raytrain_over_phalanx": sides["raytrain"]["downtime_s"] / phalanx,
            "torchft_over_phalanx": sides["torchft"]["downtime_s"] / phalanx,
            "targets_met": sides["raytrain"]["downtime_s"] / phalanx >= 5 and phalanx <= 10}


def node_loss_table(result: dict[str, Any]) -> str:
    rows = [("phase", "phalanx s", "Ray Train s", "torchft s")]
    for key in ("detect_s", "restart_s", "restore_s", "first_step_s", "downtime_s"):
        rows.append((key[:-2].replace("_", " "), *("n/a" if result[s][key] is None else f"{result[s][key]:.2f}"
                                                    for s in SIDES)))
    rows.append(("workers after", *(str(result[s]["to_workers"]) for s in SIDES)))
    rows.append(("restored from", *(result[s]["restored_from"] for s in SIDES)))
    rows.append(("steps lost", *(str(result[s]["steps_lost"]) for s in SIDES)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def side_main(args: argparse.Namespace) -> int:
    from benchmarks.parts import node_loss
    from benchmarks.recovery import loopback_env

    loopback_env()
    overrides = [*RUN, *args.overrides, f"train.steps={args.steps}"]
    if args.side == "torchft-replica":
        return node_loss.torchft_replica(args, args.overrides)
    result = getattr(node_loss, f"run_{args.side}")(args, args.root, overrides)
    with open(os.path.join(args.root, "result.json"), "w") as f:
        json.dump(result, f)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--old-ranks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.yaml"))
    parser.add_argument("--steps", type=int, default=60, help="node loss: steps of each run (the run must still "
                        "train when the loss is noticed and the survivors restart: tens of seconds)")
    parser.add_argument("--loss-step", type=int, default=6, help="node loss: the node goes after this step")
    parser.add_argument("--timeout", type=float, default=300.0, help="node loss: seconds one side may run")
    parser.add_argument("overrides", nargs="*", help="node loss: config overrides for every side")
    parser.add_argument("--quick", action="store_true", help="a tiny GPT, 2 repeats, 80 short steps: checks it runs")
    for hidden in ("--side", "--root", "--replica", "--lighthouse"):
        parser.add_argument(hidden, help=argparse.SUPPRESS, type=int if hidden == "--replica" else str)
    args = parser.parse_args(argv)
    if args.side:
        return side_main(args)
    if args.quick:
        args.d_model, args.layers, args.repeats, args.steps, args.loss_step = 64, 2, 2, 80, 3
        args.overrides = [*QUICK_RUN, *args.overrides]
    if not 1 <= args.loss_step < args.steps:
        parser.error(f"--loss-step {args.loss_step} must be in [1, --steps) = [1, {args.steps}): a step follows it")
    result = measure(args)
    speedup = result["anchor_s"] / result["phalanx_s"]
    print(f"state: GPT d_model={args.d_model} x {args.layers} layers + AdamW, {result['bytes'] / 2**20:.1f} MiB, "
          f"layout A = {args.old_ranks} row-sharded ranks -> layout B = 1 process ({platform.machine()}, "
          f"{os.cpu_count()} cores, torch {__import__('torch').__version__})")
    print(f"phalanx reshard from keeper blocks: {result['phalanx_s'] * 1e3:8.1f} ms")
    print(f"DCP load of the same state (disk):  {result['anchor_s'] * 1e3:8.1f} ms   speedup {speedup:.2f}x "
          f"(target: reshard <= 1.2x DCP, speedup >= 0.83)", flush=True)
    lost = node_loss(args)
    if lost is not None:
        print(f"\nnode loss after step {args.loss_step} of {args.steps}, 3 workers -> 2 ({platform.machine()}, "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})")
        print(node_loss_table(lost))
        print(f"Ray Train / phalanx {lost['raytrain_over_phalanx']:.1f}x (target >= 5), torchft / phalanx "
              f"{lost['torchft_over_phalanx']:.2f}x; phalanx downtime {lost['phalanx']['downtime_s']:.2f}s "
              f"(target <= 10 s)")
    print(json.dumps({"speedup": speedup, "phalanx_ms": result["phalanx_s"] * 1e3,
                      "anchor_ms": result["anchor_s"] * 1e3, "bytes": result["bytes"], "old_ranks": args.old_ranks,
                      "d_model": args.d_model, "layers": args.layers, "node_loss": lost}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
