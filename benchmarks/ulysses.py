"""Ulysses sequence-parallel attention: phalanx's layer against DeepSpeed's DistributedAttention, in one run.

Part 1: the attention layer alone (forward + backward), same shapes, same local attention kernel
(`F.scaled_dot_product_attention`), same process group, sp = 2 and 4 on gloo over loopback; the two
layers alternate iteration by iteration so machine noise hits both. Part 2: phalanx's end-to-end
train step under torchrun for sp = 1, 2, 4 with the sequence length scaled with sp (weak scaling).

    python benchmarks/ulysses.py [--iters 20] [--skip-train]

Last line: JSON with `speedup` = DeepSpeed time / phalanx time (geometric mean over sp).
On a 2-core machine sp = 4 puts 4 processes on 2 cores: compare the two layers, not the sp degrees.
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layer_worker(rank: int, sp: int, port: int, shape: dict, iters: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(sp),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // sp))
    import deepspeed
    import torch.distributed as dist
    from deepspeed.sequence.layer import DistributedAttention

    from phalanx.models.gpt import CoreAttention
    from phalanx.parallel.sequence import UlyssesAttention

    dist.init_process_group("gloo")
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


def layer_times(sp: int, shape: dict, iters: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.spawn(_layer_worker, args=(sp, _free_port(), shape, iters, out), nprocs=sp, join=True)
        return torch.load(out)


def train_tokens_per_s(sp: int, seq_per_rank: int, steps: int) -> float:
    """Median tokens/s/device of phalanx's train step with seq_len = seq_per_rank * sp over sp ranks."""
    with tempfile.TemporaryDirectory() as root:
        seq = seq_per_rank * sp
        overrides = [f"parallel.sp={sp}", "parallel.dp=1", f"data.seq_len={seq}", f"model.max_seq_len={seq}",
                     f"train.steps={steps}", "train.batch_size=4", "train.micro_batch_size=4", "train.eval_every=0",
                     "checkpoint.persist_every=0", "log.every=1", "log.progress=none", "log.wandb=disabled",
                     f"run.dir={root}", "run.name=bench", "model.n_heads=8", "model.n_kv_heads=8", "model.d_model=256"]
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
        launcher = ([sys.executable, "-m", "phalanx"] if sp == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(sp), "--master-addr",
                     "127.0.0.1", "--master-port", str(_free_port()), "-m", "phalanx"])
        subprocess.run([*launcher, "train", os.path.join(REPO, "configs/tiny_sp.yaml"), *overrides], cwd=REPO,
                       env=env, check=True, capture_output=True, timeout=900)
        with open(os.path.join(root, "bench", "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        return statistics.median(r["tokens_per_s_per_device"] for r in rows if r["step"] > 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--skip-train", action="store_true", help="only the layer comparison")
    args = parser.parse_args()
    shape = {"batch": 2, "seq_per_rank": 512, "heads": 8, "kv_heads": 8, "head_dim": 64}

    per_sp = {}
    for sp in (2, 4):
        t = layer_times(sp, shape, args.iters)
        per_sp[sp] = {"phalanx_s": t["phalanx"], "deepspeed_s": t["deepspeed"], "speedup": t["deepspeed"] / t["phalanx"]}
        print(f"sp={sp}: phalanx {t['phalanx'] * 1e3:.2f} ms, DeepSpeed {t['deepspeed'] * 1e3:.2f} ms, "
              f"speedup {per_sp[sp]['speedup']:.3f}", flush=True)

    train = {}
    if not args.skip_train:
        for sp in (1, 2, 4):
            train[sp] = train_tokens_per_s(sp, seq_per_rank=256, steps=12)
            print(f"train step, sp={sp}, seq_len={256 * sp}: {train[sp]:,.0f} tokens/s/device", flush=True)

    result = {
        "bench": "ulysses",
        "anchor": "deepspeed.sequence.layer.DistributedAttention",
        "speedup": math.exp(statistics.mean(math.log(v["speedup"]) for v in per_sp.values())),
        "layer": {f"sp{sp}": v for sp, v in per_sp.items()},
        "shape": shape,
        "train_tokens_per_s_per_device": {f"sp{sp}_seq{256 * sp}": v for sp, v in train.items()},
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores), gloo",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
