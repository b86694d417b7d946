"""Ulysses sequence-parallel attention: phalanx's layer against DeepSpeed's DistributedAttention, in one run.

Part 1: the attention layer alone (forward + backward), same shapes, same local attention kernel
(`F.scaled_dot_product_attention`), same process group, sp = 2 and 4 on gloo over loopback; the two
layers alternate iteration by iteration so machine noise hits both. Part 2: phalanx's end-to-end
train step under torchrun for sp = 1, 2, 4 with the sequence length scaled with sp (weak scaling).

    python benchmarks/ulysses.py [--iters 20] [--skip-train]
    python benchmarks/ulysses.py --quick     # tiny shapes, layers at sp = 2, a train run at sp = 1: checks it runs

Last line: JSON with `speedup` = DeepSpeed time / phalanx time (geometric mean over sp).
On a 2-core machine sp = 4 puts 4 processes on 2 cores: compare the two layers, not the sp degrees.
--quick also forks the layer ranks instead of spawning them, so they inherit the parent's imports.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from phalanx.parallel.local_ranks import free_port  # noqa: E402

SHAPE = {"batch": 2, "seq_per_rank": 512, "heads": 8, "kv_heads": 8, "head_dim": 64}
TRAIN_MODEL = ["model.n_heads=8", "model.n_kv_heads=8", "model.d_model=256"]
# --quick: checks the script runs (the test suite's run); not a result.
QUICK = {"iters": 2, "layer_sp": [2], "train_sp": [1], "train_steps": 5, "train_seq_per_rank": 32,
         "start_method": "fork"}
QUICK_SHAPE = {"batch": 1, "seq_per_rank": 32, "heads": 4, "kv_heads": 4, "head_dim": 16}
QUICK_TRAIN_MODEL = ["model.n_heads=4", "model.n_kv_heads=4", "model.d_model=64", "model.n_layers=2"]


def _layer_worker(rank: int, sp: int, port: int, shape: dict, iters: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(sp),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // sp))
    import deepspeed
    import torch.distributed as dist
    from deepspeed.sequence.layer import DistributedAttention

    from phalanx.models.gpt import CoreAttention
    from phalanx.parallel.sequence import UlyssesAttention
    from phalanx.parallel.zero import no_shared_memory_all_reduce

    dist.init_process_group("gloo")
    no_shared_memory_all_reduce()  # an inference-only op DeepSpeed would compile first (not timed either way)
    deepspeed.init_distributed(dist_backend="gloo")
    group = dist.new_group(list(range(sp)))
    B, T, H, KV, D = shape["batch"], shape["seq_per_rank"] * sp, shape["heads"], shape["kv_heads"], shape["head_dim"]
    layers = {
        "phalanx": lambda q, k, v, layer=UlyssesAttention(CoreAttention(), group, sp, repeat=1): layer(q, k, v),
        "deepspeed": lambda q, k, v, layer=DistributedAttention(CoreAttention(), group, 2, 1): layer(q, k, v, 0),
    }
    g = torch.Generator().manual_seed(rank)
    inputs = [torch.randn(B, T // sp, h, D, generator=g) for h in (H, KV, KV)]
    grad = torch.randn(B, T // sp, H, D, generator=g)
    times: dict[str, list[float]] = {name: [] for name in layers}
    for it in range(iters + 3):
        for name, layer in layers.items():
            q, k, v = (t.clone().requires_grad_() for t in inputs)
            dist.barrier(group)
            start = time.perf_counter()
            layer(q, k, v).backward(grad)
            dist.barrier(group)  # the slowest rank's time is the layer's time
            if it >= 3:
                times[name].append(time.perf_counter() - start)
    if rank == 0:
        torch.save({name: statistics.median(t) for name, t in times.items()}, out)
    dist.barrier()
    dist.destroy_process_group()


def layer_times(sp: int, shape: dict, iters: int, start_method: str = "spawn") -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.start_processes(_layer_worker, args=(sp, free_port(), shape, iters, out), nprocs=sp, join=True,
                           start_method=start_method)
        return torch.load(out)


def train_tokens_per_s(sp: int, seq_per_rank: int, steps: int, model: list[str] = TRAIN_MODEL) -> float:
    """Median tokens/s/device of phalanx's train step with seq_len = seq_per_rank * sp over sp ranks (steps after
    the third)."""
    with tempfile.TemporaryDirectory() as root:
        seq = seq_per_rank * sp
        overrides = [f"parallel.sp={sp}", "parallel.dp=1", f"data.seq_len={seq}", f"model.max_seq_len={seq}",
                     f"train.steps={steps}", "train.batch_size=4", "train.micro_batch_size=4", "train.eval_every=0",
                     "checkpoint.persist_every=0", "log.every=1", "log.progress=none", "log.wandb=disabled",
                     f"run.dir={root}", "run.name=bench", *model]
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
        launcher = ([sys.executable, "-m", "phalanx"] if sp == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(sp), "--master-addr",
                     "127.0.0.1", "--master-port", str(free_port()), "-m", "phalanx"])
        done = subprocess.run([*launcher, "train", os.path.join(REPO, "configs/tiny_sp.yaml"), *overrides], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise SystemExit(f"ulysses benchmark: the sp={sp} train run exited with {done.returncode}; its last "
                             f"output:\n{(done.stdout + done.stderr)[-3000:]}")
        with open(os.path.join(root, "bench", "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        return statistics.median(r["tokens_per_s_per_device"] for r in rows if r["step"] > 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--skip-train", action="store_true", help="only the layer comparison")
    parser.add_argument("--layer-sp", type=int, nargs="+", default=[2, 4], help="sp degrees of the layer comparison")
    parser.add_argument("--train-sp", type=int, nargs="+", default=[1, 2, 4], help="sp degrees of the train steps")
    parser.add_argument("--train-steps", type=int, default=12, help="steps per train run (the median skips 3)")
    parser.add_argument("--train-seq-per-rank", type=int, default=256, help="train tokens per rank per sequence")
    parser.add_argument("--start-method", choices=("spawn", "fork"), default="spawn",
                        help="how the layer comparison's ranks are started")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, layers at sp = 2, one train run at sp = 1, "
                        "forked ranks (the test suite's run)")
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    shape, model = (QUICK_SHAPE, QUICK_TRAIN_MODEL) if args.quick else (SHAPE, TRAIN_MODEL)
    if args.start_method == "fork":
        import deepspeed  # noqa: F401  (imported once here; the forked ranks inherit it)

    per_sp = {}
    for sp in args.layer_sp:
        t = layer_times(sp, shape, args.iters, args.start_method)
        per_sp[sp] = {"phalanx_s": t["phalanx"], "deepspeed_s": t["deepspeed"], "speedup": t["deepspeed"] / t["phalanx"]}
        print(f"sp={sp}: phalanx {t['phalanx'] * 1e3:.2f} ms, DeepSpeed {t['deepspeed'] * 1e3:.2f} ms, "
              f"speedup {per_sp[sp]['speedup']:.3f}", flush=True)

    train = {}
    if not args.skip_train:
        seq = args.train_seq_per_rank
        for sp in args.train_sp:
            train[sp] = train_tokens_per_s(sp, seq_per_rank=seq, steps=args.train_steps, model=model)
            print(f"train step, sp={sp}, seq_len={seq * sp}: {train[sp]:,.0f} tokens/s/device", flush=True)

    result = {
        "bench": "ulysses",
        "anchor": "deepspeed.sequence.layer.DistributedAttention",
        "speedup": math.exp(statistics.mean(math.log(v["speedup"]) for v in per_sp.values())),
        "layer": {f"sp{sp}": v for sp, v in per_sp.items()},
        "shape": shape,
        "train_tokens_per_s_per_device": {f"sp{sp}_seq{args.train_seq_per_rank * sp}": v for sp, v in train.items()},
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores), gloo",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
