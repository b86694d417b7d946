"""Checkpoint cost to training: phalanx's per-step snapshot vs `torch.save` vs DCP `async_save`, one run.

    .venv/bin/python benchmarks/checkpoint.py [--d-model 512 --layers 8] [--reps 4] [--blocks 4] [--steps 3]
    python3 benchmarks/checkpoint.py --device cuda --d-model 1024 --layers 28 --heads 16 --kv-heads 16 \
        --seq 1024 --batch 16 --micro 16 --dtype bf16          # the issue's 356M GPU case (benchmarks/gpu/)
    .venv/bin/python benchmarks/checkpoint.py --quick         # a tiny GPT, one checkpoint each, 1 MiB codec: checks it runs

One process trains one GPT (configs/tiny.yaml widened; AdamW state included) with a Trainer built
in-process. Every method checkpoints the same `trainer.state_dict()`:

- stall per checkpoint: the seconds the training thread waits. `torch.save` to a file: all of it.
  DCP `async_save`: until it returns (its staging copy; the write completes in a thread, reported
  too). phalanx: `snapshot()` after the optimizer step plus the next step's `wait_copied()` (its
  `stall_s`), measured inside the training loop; also `snapshot()` + an immediate `wait_copied()`
  (the copy not overlapped by compute), with the main-thread parts timed one by one.
- step-time overhead of snapshotting every step: blocks of steps with and without a snapshot after
  each step, interleaved (off, on, on, off, ...) in the same trainer so machine noise hits both;
  medians compared. The target's figure times whole blocks (one synchronise at each block's end, as
  the trainer runs: it synchronises at logged steps only); a second figure times each step alone
  (a GPU synchronise after each), in wall time and in this process's CPU time (which other tenants of
  a shared machine disturb less, and which counts the background copy and commit).
- erasure encode/decode GB/s of phalanx vs zfec and pyeclib (`benchmarks/erasure.py`) for k=4, m=2,
  on 64 MiB and on one rank's snapshot block of this model; with `--device cuda`, also on the GPU
  (phalanx's Triton kernel vs its torch table-lookup path) on `--gpu-codec-mib` of data.

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

from phalanx.config import load_config  # noqa: E402
from phalanx.parallel import validate  # noqa: E402
from phalanx.parallel.dist import DistContext  # noqa: E402
from phalanx.trainer import Trainer  # noqa: E402
from phalanx.trainer.rundir import prepare_run_dir  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --quick: a GPT of ~0.1M parameters, one checkpoint per method, one block per mode, codecs on 1 MiB; not a result.
QUICK = {"d_model": 64, "layers": 2, "heads": 4, "kv_heads": 2, "seq": 32, "batch": 4, "micro": 4, "reps": 1,
         "blocks": 1, "steps": 2, "codec_mib": 1, "codec_repeats": 1}


def build_trainer(root: str, args: argparse.Namespace) -> Trainer:
    overrides = [f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", f"model.n_heads={args.heads}",
                 f"model.n_kv_heads={args.kv_heads}", f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}",
                 f"train.batch_size={args.batch}", f"train.micro_batch_size={args.micro}", f"train.dtype={args.dtype}",
                 "train.eval_every=0", "train.steps=100000", "log.wandb=disabled",
                 "log.progress=none", f"run.dir={root}", "run.name=bench", "checkpoint.snapshot_every=1",
                 "checkpoint.persist_every=0", "checkpoint.keeper_linger_s=60"]
    if args.keeper_dir:
        overrides.append(f"checkpoint.keeper_dir={args.keeper_dir}")
    cfg = validate(load_config(os.path.join(REPO, "configs", "tiny.yaml"), overrides))
    run_dir, _ = prepare_run_dir(cfg)
    device = torch.device(args.device)
    return Trainer(cfg, DistContext(rank=0, world_size=1, local_rank=0, device=device), run_dir)


def sync(trainer: Trainer) -> None:
    """Wall times on a GPU count the queued kernels too."""
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)


def train_step(trainer: Trainer, synchronize: bool = True) -> None:
    trainer.train_step(trainer.data.next_step())
    trainer.step += 1
    if synchronize:
        sync(trainer)


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
    layout = engine.measured.layout
    scratch = torch.empty(layout.nbytes, dtype=torch.uint8)

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
        timed("layout_matches", lambda: layout.matches(state))
        timed("keeper_rpc", lambda: engine.slots.call("hello"))  # one round trip, as `begin` is
        timed("skeleton_json", lambda: layout.write_skeleton(scratch, state))
        sources, views = timed("tensor_lists", lambda: (layout.tensors(state), layout.views(scratch)))
        timed("copy_1_thread", lambda: [v.copy_(s.detach()) for v, s in zip(views, sources)])
    return parts


def measure_gpu_codec(k: int, m: int, nbytes: int, repeats: int = 10) -> dict[str, Any]:
    """Encode/decode GB/s of data on the GPU: phalanx's Triton kernel (if Triton is there) and its torch path;
    checked against the CPU codec on a slice first."""
    from unittest import mock

    from phalanx.checkpoint import gf256
    from phalanx.checkpoint.erasure import ErasureCodec

    codec, block = ErasureCodec(k, m), -(-nbytes // k)
    gen = torch.Generator(device="cuda").manual_seed(k * 100 + m)
    data = [torch.randint(0, 256, (block,), dtype=torch.uint8, device="cuda", generator=gen) for _ in range(k)]
    out = codec.encode(data)
    head = 1 << 20
    want = codec.encode([d[:head].cpu() for d in data])
    assert all(torch.equal(o[:head].cpu(), w) for o, w in zip(out, want)), "GPU parity differs from the CPU codec's"
    survivors = {i: b for i, b in enumerate(data + out) if i >= m}  # data blocks 0..m-1 lost
    assert all(torch.equal(a, b) for a, b in zip(codec.decode(survivors), data)), "GPU decode did not rebuild the data"

    def gbps(fn: Callable[[], Any], reps: int) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return k * block / statistics.median(times) / 1e9

    result = {"k": k, "m": m, "data_bytes": k * block, "kernel": "triton" if gf256.triton_dot() else "torch",
              "encode_gbps": gbps(lambda: codec.encode(data, out=out), repeats),
              "decode_gbps": gbps(lambda: codec.decode(survivors), repeats)}
    with mock.patch.object(gf256, "triton_dot", lambda: None):  # the torch table-lookup path
        result["torch_encode_gbps"] = gbps(lambda: codec.encode(data, out=out), max(2, repeats // 3))
        result["torch_decode_gbps"] = gbps(lambda: codec.decode(survivors), max(2, repeats // 3))
    return result


def snapshot_matches_state(trainer: Trainer) -> bool:
    """The newest committed snapshot, fetched back from the keeper and unpacked, equals the live state bit for
    bit (nothing trained since it was taken)."""
    from phalanx.checkpoint.flat import flatten_state_dict

    engine = trainer.snapshots
    step, layout = engine.finish(), engine.measured.layout
    _, data = engine.slots.request("fetch", rank=trainer.ctx.rank, step=step, limit=layout.nbytes)
    held, _ = flatten_state_dict(layout.unpack(torch.frombuffer(bytearray(data), dtype=torch.uint8)))
    live, _ = flatten_state_dict(trainer.state_dict())
    same = set(held) == set(live)
    for key, value in live.items():
        if isinstance(value, torch.Tensor):
            same = same and torch.equal(held[key].cpu(), value.detach().cpu())
    return same


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


def queued_overhead(trainer: Trainer, blocks: int, steps: int) -> dict[str, Any]:
    """As `step_overhead`, without a synchronise per step: the GPU queue stays ahead as in a real loop, and
    each block's wall time (one synchronise at its end) over its steps is the step time."""
    engine = trainer.snapshots
    per_step: dict[bool, list[float]] = {False: [], True: []}
    for block in range(2 * blocks):
        on = block % 4 in (1, 2)
        train_step(trainer)  # the switch
        if on:
            engine.snapshot(trainer.step)
        start = time.perf_counter()
        for _ in range(steps):
            train_step(trainer, synchronize=False)
            if on:
                engine.snapshot(trainer.step)
        sync(trainer)
        per_step[on].append((time.perf_counter() - start) / steps)
        engine.finish()
    off, on_ = statistics.median(per_step[False]), statistics.median(per_step[True])
    return {"step_ms_off": 1e3 * off, "step_ms_on": 1e3 * on_, "overhead_pct": 100 * (on_ / off - 1),
            "blocks_each": len(per_step[True])}


def overhead_variants(trainer: Trainer, blocks: int, steps: int) -> None:
    """--overhead-only: the per-step overhead three ways in one process (GPU diagnosis)."""
    base = step_overhead(trainer, blocks, steps)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        short = step_overhead(trainer, blocks, steps)
    finally:
        sys.setswitchinterval(interval)
    queued = queued_overhead(trainer, blocks, steps)
    for name, r in (("synchronise per step", base), ("synchronise per step, GIL switch 0.5 ms", short),
                    ("no per-step synchronise (block time)", queued)):
        print(f"{name}: {r['step_ms_on']:.1f} vs {r['step_ms_off']:.1f} ms: {r['overhead_pct']:+.2f}%", flush=True)
    print(json.dumps({"bench": "checkpoint-overhead", "sync_per_step": base["overhead_pct"],
                      "sync_per_step_switch_0_5ms": short["overhead_pct"], "queued": queued["overhead_pct"],
                      "queued_step_ms": [queued["step_ms_on"], queued["step_ms_off"]]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--reps", type=int, default=4, help="checkpoints per method (after one warm-up)")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per mode in the overhead measurement")
    parser.add_argument("--steps", type=int, default=3, help="steps per block")
    parser.add_argument("--batch", type=int, default=16,
                        help="sequences per step (16 x 128: 2,048 tokens; real runs take ~1M per step)")
    parser.add_argument("--micro", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--keeper-dir", default="", help="checkpoint.keeper_dir (default /dev/shm/phalanx-UID)")
    parser.add_argument("--gpu-codec-mib", type=int, default=1024, help="data MiB for the GPU codec figures")
    parser.add_argument("--codec-mib", type=int, default=64, help="data MiB for the CPU codec figures")
    parser.add_argument("--codec-repeats", type=int, default=5, help="timed runs per CPU codec figure (3 at most "
                        "on the snapshot block)")
    parser.add_argument("--overhead-only", action="store_true",
                        help="only the per-step overhead, three ways (per-step synchronise, shorter GIL switch "
                             "interval, none)")
    parser.add_argument("--quick", action="store_true", help="tiny model, one checkpoint per method, codecs on "
                        "1 MiB (the test suite's run)")
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
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
        state_bytes = engine.measured.layout.nbytes
        print(f"model {params / 1e6:.1f}M parameters; checkpoint state {state_bytes / 2**20:.0f} MiB "
              f"(weights + AdamW moments); torch threads {torch.get_num_threads()}", flush=True)

        if args.overhead_only:
            overhead_variants(trainer, args.blocks, args.steps)
            return
        overhead = step_overhead(trainer, args.blocks, args.steps)
        queued = queued_overhead(trainer, args.blocks, args.steps)
        saved = stall_torch_save(trainer, folder, args.reps)
        dcp_stall, dcp_done = stall_dcp_async(trainer, folder, args.reps)
        direct = stall_phalanx_unoverlapped(trainer, args.reps)
        pinned = len(engine.slots.pinned)  # keeper slots page-locked for device-to-host copies (GPU)
        matches = snapshot_matches_state(trainer)
        print(f"newest snapshot read back from the keeper equals the live state bit for bit: {matches}", flush=True)
    finally:
        trainer.snapshots.close(release=True)
        shutil.rmtree(root, ignore_errors=True)

    small = measure_codecs(4, 2, args.codec_mib << 20, repeats=args.codec_repeats)
    # On a GPU the state is GBs: the torch path would take minutes on it; the GPU codec is measured instead.
    block = measure_codecs(4, 2, state_bytes, repeats=min(3, args.codec_repeats)) if not cuda else None
    gpu_codec = measure_gpu_codec(4, 2, args.gpu_codec_mib << 20) if cuda else None

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
    print(f"step time as the trainer runs (no synchronise per step; block wall time / steps): "
          f"{queued['step_ms_on']:.1f} vs {queued['step_ms_off']:.1f} ms (median of {queued['blocks_each']} blocks "
          f"each): overhead {queued['overhead_pct']:+.2f}%")
    print("\nerasure k=4 m=2, GB/s of data, one thread")
    print("| data | phalanx enc | phalanx dec | zfec enc | zfec dec | pyeclib enc | pyeclib dec |\n|---|---|---|---|---|---|---|")
    for name, r in ((f"{args.codec_mib} MiB", small), (f"{state_bytes / 2**20:.0f} MiB (one block)", block)):
        if r is None:
            continue
        cells = [r["encode_gbps"], r["decode_gbps"], r["zfec_encode_gbps"], r["zfec_decode_gbps"],
                 r["pyeclib_encode_gbps"], r["pyeclib_decode_gbps"]]
        print(f"| {name} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    if gpu_codec:
        print(f"\nerasure k=4 m=2 on {torch.cuda.get_device_name()}, {gpu_codec['data_bytes'] / 2**20:.0f} MiB of data, "
              f"GB/s: {gpu_codec['kernel']} encode {gpu_codec['encode_gbps']:.1f}, decode "
              f"{gpu_codec['decode_gbps']:.1f}; torch path encode {gpu_codec['torch_encode_gbps']:.1f}, decode "
              f"{gpu_codec['torch_decode_gbps']:.1f}")

    speedup = stall_ms["dcp.async_save"] / stall_ms["phalanx"]
    targets = {"stall_le_1pct_of_async_save": stall_ms["phalanx"] <= 0.01 * stall_ms["dcp.async_save"],
               "step_overhead_le_2pct": queued["overhead_pct"] <= 2.0,
               "encode_ge_2gbps_per_core": small["encode_gbps"] >= 2.0}
    if gpu_codec:
        targets["gpu_encode_ge_100gbps"] = gpu_codec["encode_gbps"] >= 100.0
    print("\ntargets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    print(json.dumps({
        "bench": "checkpoint", "anchor": "dcp.async_save", "speedup": speedup, "stall_ms": stall_ms,
        "dcp_async_save_complete_ms": ms(dcp_done), "stall_vs_async_save_pct": 100 / speedup,
        "phalanx_parts_ms": {k: ms(v) for k, v in direct.items()},
        "step_ms": {"snapshot_every_step": overhead["step_ms_on"], "no_snapshot": overhead["step_ms_off"]},
        "step_overhead_pct": queued["overhead_pct"], "step_overhead_pct_sync_per_step": overhead["overhead_pct"],
        "step_overhead_pct_sync_per_step_mean": overhead["overhead_pct_mean"],
        "step_cpu_overhead_pct": overhead["cpu_overhead_pct"],
        "encode_gbps": small["encode_gbps"], "decode_gbps": small["decode_gbps"],
        "zfec_encode_gbps": small["zfec_encode_gbps"], "pyeclib_encode_gbps": small["pyeclib_encode_gbps"],
        "encode_gbps_block": block and block["encode_gbps"], "decode_gbps_block": block and block["decode_gbps"],
        "zfec_encode_gbps_block": block and block["zfec_encode_gbps"],
        "pyeclib_encode_gbps_block": block and block["pyeclib_encode_gbps"], "gpu_codec": gpu_codec,
        "targets": targets, "params": params, "state_bytes": state_bytes,
        "tokens_per_step": args.batch * args.seq, "dtype": args.dtype,
        "pinned_slots": pinned if cuda else None, "snapshot_matches_state": matches,
        "device": (torch.cuda.get_device_name() if cuda else
                   f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
