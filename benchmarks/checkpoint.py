"""Checkpoint cost to training: phalanx's per-step snapshot vs `torch.save` vs DCP `async_save`, one run.

    .venv/bin/python benchmarks/checkpoint.py [--d-model 512 --layers 8] [--reps 4] [--blocks 4] [--steps 3]

One CPU process trains one GPT (configs/tiny.yaml widened to ~25M parameters; AdamW state included)
with a Trainer built in-process. Every method checkpoints the same `trainer.state_dict()`:

- stall per checkpoint: the seconds the training thread waits. `torch.save` to a file: all of it.
  DCP `async_save`: until it returns (its staging copy; the write completes in a thread, reported
  too). phalanx: `snapshot()` after the optimizer step plus the next step's `wait_copied()` (its
  `stall_s`), measured inside the training loop; also `snapshot()` + an immediate `wait_copied()`
  (the copy not overlapped by compute), with the main-thread parts timed one by one.
- step-time overhead of snapshotting every step: blocks of steps with and without a snapshot after
  each step, interleaved (off, on, on, off, ...) in the same trainer so machine noise hits both;
  medians compared, in wall time and in this process's CPU time (which other tenants of a shared
  machine disturb less, and which counts the background copy and commit).
- erasure encode/decode GB/s of phalanx vs zfec and pyeclib (`benchmarks/erasure.py`) for k=4, m=2,
  on 64 MiB and on one rank's snapshot block of this model.

Targets: stall <= 1% of DCP async_save's; snapshot overhead <= 2% of step time; encode >= 2 GB/s per core.
Last line: JSON with `speedup` = DCP async_save stall / phalanx stall.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from erasure import measure_codecs  # noqa: E402

from phalanx.config import load_config, validate  # noqa: E402
from phalanx.launch.dist import DistContext  # noqa: E402
from phalanx.trainer import Trainer  # noqa: E402
from phalanx.trainer.rundir import prepare_run_dir  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def build_trainer(root: str, args: argparse.Namespace) -> Trainer:
    overrides = [f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", "model.n_heads=8",
                 "model.n_kv_heads=4", "model.max_seq_len=128", "data.seq_len=128",
                 f"train.batch_size={args.batch}", "train.micro_batch_size=4", "train.eval_every=0", "train.steps=100000", "log.wandb=disabled",
                 "log.progress=none", f"run.dir={root}", "run.name=bench", "checkpoint.snapshot_every=1",
                 "checkpoint.persist_every=0", "checkpoint.keeper_linger_s=60"]
    cfg = validate(load_config(os.path.join(REPO, "configs", "tiny.yaml"), overrides))
    run_dir, _ = prepare_run_dir(cfg)
    return Trainer(cfg, CPU, run_dir)


def train_step(trainer: Trainer) -> None:
    trainer.train_step(trainer.data.next_step())
    trainer.step += 1


def ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


# ---- stall per checkpoint, one method at a time (after a training step each) -------------------


def stall_torch_save(trainer: Trainer, folder: str, reps: int) -> list[float]:
    times = []
    for rep in range(reps + 1):
        train_step(trainer)
        path = os.path.join(folder, f"torch-{rep}.pt")
        start = time.perf_counter()
        torch.save(trainer.state_dict(), path)
        if rep:  # the first is a warm-up
            times.append(time.perf_counter() - start)
        os.remove(path)
    return times


def stall_dcp_async(trainer: Trainer, folder: str, reps: int) -> tuple[list[float], list[float]]:
    import torch.distributed.checkpoint as dcp

    stalls, completions = [], []
    for rep in range(reps + 1):
        train_step(trainer)
        path = os.path.join(folder, f"dcp-{rep}")
        start = time.perf_counter()
        future = dcp.async_save(trainer.state_dict(), checkpoint_id=path, no_dist=True)
        returned = time.perf_counter()
        future.result()
        if rep:
            stalls.append(returned - start)
            completions.append(time.perf_counter() - start)
        shutil.rmtree(path, ignore_errors=True)
    return stalls, completions


def stall_phalanx_unoverlapped(trainer: Trainer, reps: int) -> dict[str, list[float]]:
    """`snapshot()` and an immediate `wait_copied()` (no compute to hide the copy behind), and the
    main-thread parts of `snapshot()` timed one by one on the same state."""
    engine = trainer.snapshots
    parts: dict[str, list[float]] = {k: [] for k in ("snapshot", "wait_copied", "total", "state_dict",
                                                     "layout_matches", "keeper_rpc", "skeleton_json",
                                                     "tensor_lists", "copy_1_thread")}
    scratch = torch.empty(engine.layout.nbytes, dtype=torch.uint8)

    def timed(key: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        parts[key].append(time.perf_counter() - start)
        return out

    for rep in range(reps + 1):
        train_step(trainer)
        engine.finish()
        start = time.perf_counter()
        engine.snapshot(trainer.step)
        mid = time.perf_counter()
        engine.wait_copied()
        end = time.perf_counter()
        engine.finish()
        if not rep:
            continue
        parts["snapshot"].append(mid - start)
        parts["wait_copied"].append(end - mid)
        parts["total"].append(end - start)
        state = timed("state_dict", engine.state_fn)
        timed("layout_matches", lambda: engine.layout.matches(state))
        timed("keeper_rpc", lambda: engine._call("hello"))  # one round trip, as `begin` is
        timed("skeleton_json", lambda: engine.layout.write_skeleton(scratch, state))
        sources, views = timed("tensor_lists", lambda: (engine.layout.tensors(state), engine.layout.views(scratch)))
        timed("copy_1_thread", lambda: [v.copy_(s.detach()) for v, s in zip(views, sources)])
    return parts


# ---- per-step overhead, interleaved blocks ---------------------------------------------------


def step_overhead(trainer: Trainer, blocks: int, steps: int) -> dict[str, Any]:
    """Alternating blocks of `steps` steps without and with a snapshot after each step. A step with
    snapshots is timed from the start of its forward to the return of its `snapshot()`; each block
    ends with the snapshot job finished outside the timing, so no block pays for another's work."""
    engine = trainer.snapshots
    times: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}  # this process's CPU seconds (all its threads)
    stalls: list[float] = []  # snapshot() of step i + wait_copied() inside step i+1
    for block in range(2 * blocks):
        on = block % 4 in (1, 2)  # off, on, on, off, ...: a drift in machine load hits both alike
        for i in range(steps):
            before = engine.stall_s
            start, cpu_start = time.perf_counter(), time.process_time()
            train_step(trainer)
            if on:
                engine.snapshot(trainer.step)
            elapsed, cpu_used = time.perf_counter() - start, time.process_time() - cpu_start
            if i:  # the first step of a block warms up after the switch
                times[on].append(elapsed)
                cpu[on].append(cpu_used)
                if on:
                    stalls.append(engine.stall_s - before)
        engine.finish()
    off, on_ = statistics.median(times[False]), statistics.median(times[True])
    mean_off, mean_on = statistics.fmean(times[False]), statistics.fmean(times[True])
    cpu_off, cpu_on = statistics.median(cpu[False]), statistics.median(cpu[True])
    return {"step_ms_off": 1e3 * off, "step_ms_on": 1e3 * on_, "overhead_pct": 100 * (on_ / off - 1),
            "overhead_pct_mean": 100 * (mean_on / mean_off - 1), "steps_each": len(times[True]),
            "cpu_ms_off": 1e3 * cpu_off, "cpu_ms_on": 1e3 * cpu_on, "cpu_overhead_pct": 100 * (cpu_on / cpu_off - 1),
            "stall_ms": ms(stalls), "stall_ms_max": 1e3 * max(stalls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--reps", type=int, default=4, help="checkpoints per method (after one warm-up)")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per mode in the overhead measurement")
    parser.add_argument("--steps", type=int, default=3, help="steps per block")
    parser.add_argument("--batch", type=int, default=16,
                        help="sequences of 128 tokens per step (16: 2,048 tokens; real runs take ~1M per step)")
    args = parser.parse_args()
    # DCP without a process group says "assuming the intent is to save in a single process": it is.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")

    root = tempfile.mkdtemp(prefix="phalanx-bench-ckpt-")
    folder = os.path.join(root, "files")
    os.makedirs(folder)
    trainer = build_trainer(root, args)
    try:
        engine = trainer.snapshots
        params = sum(p.numel() for p in trainer.model.parameters())
        for _ in range(2):  # warm-up: AdamW state exists from the first step on
            train_step(trainer)
        state_bytes = engine.layout.nbytes
        print(f"model {params / 1e6:.1f}M parameters; checkpoint state {state_bytes / 2**20:.0f} MiB "
              f"(weights + AdamW moments); torch threads {torch.get_num_threads()}", flush=True)

        overhead = step_overhead(trainer, args.blocks, args.steps)
        saved = stall_torch_save(trainer, folder, args.reps)
        dcp_stall, dcp_done = stall_dcp_async(trainer, folder, args.reps)
        direct = stall_phalanx_unoverlapped(trainer, args.reps)
    finally:
        trainer.snapshots.close(release=True)
        shutil.rmtree(root, ignore_errors=True)

    small = measure_codecs(4, 2, 64 << 20)
    block = measure_codecs(4, 2, state_bytes, repeats=3)

    stall_ms = {"phalanx": overhead["stall_ms"], "phalanx_unoverlapped": ms(direct["total"]),
                "torch.save": ms(saved), "dcp.async_save": ms(dcp_stall)}
    print("\nstall per checkpoint (training thread waits), medians of "
          f"{args.reps} (phalanx in-loop: {overhead['steps_each']} steps)")
    print("| method | stall ms | notes |\n|---|---|---|")
    print(f"| phalanx snapshot (in the training loop) | {stall_ms['phalanx']:.2f} | snapshot() + next step's "
          f"wait_copied(); max {overhead['stall_ms_max']:.2f} |")
    print(f"| phalanx snapshot + immediate wait_copied | {stall_ms['phalanx_unoverlapped']:.2f} | "
          f"snapshot() {ms(direct['snapshot']):.2f} + copy wait {ms(direct['wait_copied']):.2f} |")
    print(f"| torch.save | {stall_ms['torch.save']:.2f} | whole save to local disk |")
    print(f"| DCP async_save | {stall_ms['dcp.async_save']:.2f} | until it returns; write done after "
          f"{ms(dcp_done):.0f} ms |")
    print("\nphalanx snapshot() main-thread parts, ms (median): " + ", ".join(
        f"{k} {ms(direct[k]):.2f}" for k in ("state_dict", "layout_matches", "keeper_rpc", "skeleton_json",
                                               "tensor_lists", "copy_1_thread")))
    print(f"\nstep time, snapshot every step vs none: {overhead['step_ms_on']:.1f} vs {overhead['step_ms_off']:.1f} "
          f"ms (median of {overhead['steps_each']} each): overhead {overhead['overhead_pct']:+.2f}% "
          f"(means: {overhead['overhead_pct_mean']:+.2f}%); this process's CPU time per step "
          f"{overhead['cpu_ms_on']:.0f} vs {overhead['cpu_ms_off']:.0f} ms: {overhead['cpu_overhead_pct']:+.2f}%")
    print("\nerasure k=4 m=2, GB/s of data, one thread")
    print("| data | phalanx enc | phalanx dec | zfec enc | zfec dec | pyeclib enc | pyeclib dec |\n|---|---|---|---|---|---|---|")
    for name, r in (("64 MiB", small), (f"{state_bytes / 2**20:.0f} MiB (one block)", block)):
        cells = [r["encode_gbps"], r["decode_gbps"], r["zfec_encode_gbps"], r["zfec_decode_gbps"],
                 r["pyeclib_encode_gbps"], r["pyeclib_decode_gbps"]]
        print(f"| {name} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")

    speedup = stall_ms["dcp.async_save"] / stall_ms["phalanx"]
    targets = {"stall_le_1pct_of_async_save": stall_ms["phalanx"] <= 0.01 * stall_ms["dcp.async_save"],
               "step_overhead_le_2pct": overhead["overhead_pct"] <= 2.0,
               "encode_ge_2gbps_per_core": small["encode_gbps"] >= 2.0}
    print("\ntargets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    print(json.dumps({
        "bench": "checkpoint", "anchor": "dcp.async_save", "speedup": speedup, "stall_ms": stall_ms,
        "dcp_async_save_complete_ms": ms(dcp_done), "stall_vs_async_save_pct": 100 / speedup,
        "phalanx_parts_ms": {k: ms(v) for k, v in direct.items()},
        "step_ms": {"snapshot_every_step": overhead["step_ms_on"], "no_snapshot": overhead["step_ms_off"]},
        "step_overhead_pct": overhead["overhead_pct"], "step_overhead_pct_mean": overhead["overhead_pct_mean"],
        "step_cpu_overhead_pct": overhead["cpu_overhead_pct"],
        "encode_gbps": small["encode_gbps"], "decode_gbps": small["decode_gbps"],
        "zfec_encode_gbps": small["zfec_encode_gbps"], "pyeclib_encode_gbps": small["pyeclib_encode_gbps"],
        "encode_gbps_block": block["encode_gbps"], "decode_gbps_block": block["decode_gbps"],
        "zfec_encode_gbps_block": block["zfec_encode_gbps"], "pyeclib_encode_gbps_block": block["pyeclib_encode_gbps"],
        "targets": targets, "params": params, "state_bytes": state_bytes,
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)", "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
