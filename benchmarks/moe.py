"""MoE layer: phalanx's against DeepSpeed's `deepspeed.moe.layer.MoE`, forward + backward, in one run.

Same hidden size, experts (SwiGLU, the same hidden size), top-k, capacity factor and tokens; both
drop over capacity (DeepSpeed: per rank's tokens; phalanx: per sequence, see models/routing.py),
DeepSpeed's random token selection and second-expert sampling are off so both route
deterministically. The two layers alternate iteration by iteration so machine noise hits both.

Part 1: one process (CPU; or one GPU with --device cuda, bf16 autocast).
Part 2: ep = 2 on gloo over loopback, each rank with its own tokens and half the experts (CPU only).

    python benchmarks/moe.py [--iters 20] [--device cpu|cuda] [--skip-ep] [--kernel auto|grouped_mm|loop]
    python benchmarks/moe.py --quick     # a tiny layer, 2 timed iterations, forked ranks: checks it runs

--quick forks the ranks instead of spawning them, so they inherit the parent's imports (DeepSpeed's
import alone takes seconds per rank on a 2-core machine).

Last line: JSON with `speedup` = DeepSpeed time / phalanx time (geometric mean over the parts run).
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

import torch
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHAPES = {  # tokens = batch * seq per rank
    "cpu": dict(batch=16, seq=256, d_model=256, ffn=512, experts=8, top_k=2, capacity_factor=1.25),
    "cuda": dict(batch=8, seq=2048, d_model=2048, ffn=1408, experts=16, top_k=2, capacity_factor=1.25),
    "tiny": dict(batch=2, seq=32, d_model=64, ffn=128, experts=4, top_k=2, capacity_factor=1.25),  # --quick
}
QUICK = {"iters": 2, "shape": "tiny", "start_method": "fork"}  # --quick: checks the script runs; not a result


def _layers(shape: dict, ep: int, device: torch.device, kernel: str = "auto"):
    """(phalanx MoE, DeepSpeed MoE), both with `ep`-sharded experts, initialised N(0, 0.02)."""
    import torch.nn as nn
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    from phalanx.config import load_config
    from phalanx.models.mlp import SwiGLU
    from phalanx.models.moe import MoE
    from phalanx.parallel.expert import ExpertParallel

    overrides = [f"model.d_model={shape['d_model']}", f"model.moe.num_experts={shape['experts']}",
                 f"model.moe.top_k={shape['top_k']}", f"model.moe.ffn_dim={shape['ffn']}",
                 f"model.moe.capacity_factor={shape['capacity_factor']}", f"parallel.ep={ep}",
                 f"parallel.dp={ep}", "model.n_heads=8", f"model.moe.kernel={kernel}"]
    cfg = load_config(None, overrides)
    ours = nn.Module()
    with torch.device("meta"):
        ours.mlp = MoE(cfg.model)
    if ep > 1:
        from phalanx.parallel.layout import Layout

        mesh = Layout(dp=ep, ep=ep, world_size=ep).build_mesh(device.type)
        ExpertParallel.apply(ours, mesh, cfg)
    ours.to_empty(device=device)
    theirs = DeepSpeedMoE(shape["d_model"], SwiGLU(shape["d_model"], shape["ffn"]), num_experts=shape["experts"],
                          ep_size=ep, k=shape["top_k"], capacity_factor=shape["capacity_factor"],
                          eval_capacity_factor=shape["capacity_factor"], min_capacity=1, drop_tokens=True,
                          use_rts=False, top2_2nd_expert_sampling=False).to(device)
    with torch.no_grad():
        for p in [*ours.parameters(), *theirs.parameters()]:
            local = p.to_local() if hasattr(p, "to_local") else p
            local.normal_(0.0, 0.02)
    return ours.mlp, theirs


def _time_pair(ours, theirs, shape: dict, device: torch.device, iters: int, seed: int) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(shape["batch"], shape["seq"], shape["d_model"], generator=gen).to(device).requires_grad_()
    g = torch.randn(x.shape, generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def ours_step():
        with autocast:
            out = ours(x)
        (out.float() * g).sum().backward()

    def theirs_step():
        with autocast:
            out, l_aux, _ = theirs(x)
        ((out.float() * g).sum() + 0.01 * l_aux).backward()

    steps = {"phalanx": ours_step, "deepspeed": theirs_step}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(iters + 3):
        for name, step in (steps.items() if i % 2 == 0 else reversed(steps.items())):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:  # warm-up
                times[name].append(time.perf_counter() - start)
            x.grad = None
            for module in (ours, theirs):
                module.zero_grad(set_to_none=True)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {"phalanx_ms": round(med["phalanx"], 3), "deepspeed_ms": round(med["deepspeed"], 3),
            "speedup": round(med["deepspeed"] / med["phalanx"], 4)}


def _worker(rank: int, world: int, port: int, shape: dict, iters: int, device_type: str, kernel: str,
            out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import deepspeed
    import torch.distributed as dist

    from phalanx.parallel.zero import no_shared_memory_all_reduce

    backend = "nccl" if device_type == "cuda" else "gloo"
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    no_shared_memory_all_reduce()  # an inference-only op DeepSpeed would compile first (not timed either way)
    deepspeed.init_distributed(dist_backend=backend)
    ours, theirs = _layers(shape, world, device, kernel)
    result = _time_pair(ours, theirs, shape, device, iters, seed=rank)
    dist.barrier()
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def run(world: int, shape: dict, iters: int, device_type: str, kernel: str = "auto",
        start_method: str = "spawn") -> dict:
    from phalanx.parallel.local_ranks import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.start_processes(_worker, args=(world, free_port(), shape, iters, device_type, kernel, out), nprocs=world,
                           join=True, start_method=start_method)
        return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--skip-ep", action="store_true")
    parser.add_argument("--kernel", choices=("auto", "grouped_mm", "loop"), default="auto",
                        help="phalanx's expert kernel (model.moe.kernel)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="layer and token shape (default: the device's)")
    parser.add_argument("--start-method", choices=("spawn", "fork"), default="spawn", help="how ranks are started")
    parser.add_argument("--quick", action="store_true", help="tiny shape, 2 timed iterations, forked ranks "
                        "(the test suite's run)")
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    shape = SHAPES[args.shape or args.device]
    if args.start_method == "fork":
        import deepspeed  # noqa: F401  (imported once here; the forked ranks inherit it)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"device: {device_name} x{os.cpu_count()} cores, torch {torch.__version__}; shape {shape}", flush=True)

    parts = {"one_process": run(1, shape, args.iters, args.device, args.kernel, args.start_method)}
    print(f"one process: {parts['one_process']}", flush=True)
    if not args.skip_ep and args.device == "cpu":
        parts["ep2"] = run(2, shape, args.iters, args.device, args.kernel, args.start_method)
        print(f"ep=2 (gloo): {parts['ep2']}", flush=True)
    speedup = math.exp(statistics.mean(math.log(p["speedup"]) for p in parts.values()))
    print(json.dumps({"benchmark": "moe", "device": device_name, "kernel": args.kernel, "shape": shape, **parts,
                      "speedup": round(speedup, 4)}))


if __name__ == "__main__":
    main()
