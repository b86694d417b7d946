"""`phalanx plan --calibrate`: measure this cluster's compute and links with short micro-benchmarks.

Every rank runs at once, as in training, so shared cores, memory bandwidth and links are measured
under the load a step puts on them:
  * compute: forward + backward of the config's model at two sequence lengths; a line through
    (FLOPs, seconds) gives the achieved FLOP/s and a fixed cost per micro-batch (Python and kernel
    launches, which dominate small models); the same step on one rank at a time gives the speed-up a
    rank sees while the others idle (CPU ranks sharing cores; a pipeline bubble frees them);
  * optimizer: AdamW steps over the model's parameters (bytes touched per second);
  * links: all-reduce and all-to-all at sizes from 4 kB to 4 MB over all ranks; least squares fits
    latency and bandwidth to the same alpha-beta terms the cost model uses. All ranks of a one-node
    calibration share a node, so the inter-node link keeps the preset's numbers unless run across nodes
    under torchrun (then the ranks of one node and the whole world are fitted separately).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from phalanx.scheduler.topology import Link, Topology, preset

SIZES = (4 << 10, 64 << 10, 512 << 10, 4 << 20)  # bytes per collective buffer
REPEATS = 8


def _timed(fn: Any, repeats: int = REPEATS, barrier: bool = True) -> float:
    """Fastest seconds of fn() over `repeats` runs after one warm-up, all ranks starting together. The
    minimum, not the median: on a shared machine other work only ever adds time."""
    fn()
    times = []
    for _ in range(repeats):
        if barrier and dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _solo(fn: Any) -> float:
    """Seconds of fn() on each rank in turn while the others wait: what a rank gets when the rest idle."""
    if not dist.is_initialized():
        return _timed(fn)
    mine = 0.0
    for turn in range(dist.get_world_size()):
        dist.barrier()
        if turn == dist.get_rank():
            mine = _timed(fn, barrier=False)
        dist.barrier()
    return mine


def measure_compute(cfg: Any) -> tuple[float, float, float, float]:
    """(achieved FLOP/s, fixed seconds per micro-batch, optimizer bytes/s, idle speed-up) of this rank's model,
    every rank computing at once; the speed-up is how much faster one rank computes while the others idle."""
    from phalanx.models import build_on_meta, flops_per_token, materialize

    model = materialize(build_on_meta(cfg.model), torch.device("cpu"), 0)
    B, T = cfg.train.micro_batch_size, cfg.data.seq_len
    points = []
    for t in (T, max(8, T // 4)):
        tokens = torch.randint(0, cfg.model.vocab_size, (B, t + 1))

        def step() -> None:
            logits = model(tokens[:, :-1])
            F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()

        points.append((B * t * flops_per_token(cfg.model, t), _timed(step)))
        if t == T:
            idle_speedup = max(1.0, points[0][1] / _solo(step))
    (f1, s1), (f2, s2) = points
    slope = max((s1 - s2) / (f1 - f2), 1e-15)  # seconds per FLOP
    fixed = max(0.0, s1 - slope * f1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    touched = sum(p.numel() for p in model.parameters()) * 32  # cost.OPTIMIZER_TOUCH bytes per parameter
    seconds = _timed(optimizer.step)
    return 1.0 / slope, fixed, touched / seconds, idle_speedup


def _fit_link(samples: list[tuple[float, float, float]]) -> Link:
    """Least squares of seconds = latency * hops + volume / bandwidth over (hops, volume, seconds)."""
    shh = sum(h * h for h, _, _ in samples)
    svv = sum(v * v for _, v, _ in samples)
    shv = sum(h * v for h, v, _ in samples)
    shs = sum(h * s for h, _, s in samples)
    svs = sum(v * s for _, v, s in samples)
    det = shh * svv - shv * shv
    lat = (shs * svv - svs * shv) / det
    inv_bw = (shh * svs - shv * shs) / det
    if lat < 0 or inv_bw <= 0:  # noisy fit: fall back to the latency-free fit
        lat, inv_bw = 0.0, max(svs / svv, 1e-15)
    return Link(bandwidth=1.0 / inv_bw, latency_s=lat)


def measure_link(group: Any) -> Link:
    """alpha-beta of `group` from all-reduces and all-to-alls (the terms of placement.collective_time, one node)."""
    n = dist.get_world_size(group)
    samples = []
    for size in SIZES:
        buf = torch.zeros(size // 4)
        out = torch.empty_like(buf)
        t = _timed(lambda: dist.all_reduce(buf, group=group))
        samples.append((2 * (n - 1), 2 * size * (n - 1) / n, t))
        t = _timed(lambda: dist.all_to_all_single(out, buf, group=group))
        samples.append((n - 1, size * (n - 1) / n, t))
    # every rank fits its own numbers; the slowest rank's view is the one a collective waits for
    fitted = _fit_link(samples)
    worst = torch.tensor([1.0 / fitted.bandwidth, fitted.latency_s], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return Link(bandwidth=1.0 / float(worst[0]), latency_s=float(worst[1]))


def calibrate_rank(cfg: Any, nodes: int, gpus_per_node: int, device: str) -> Topology:
    """Run on every rank of the cluster (process group initialised); returns the measured topology."""
    base = preset(device, nodes=nodes, gpus_per_node=gpus_per_node, dtype=cfg.train.dtype)
    rate, fixed, optimizer, idle_speedup = measure_compute(cfg)
    stats = torch.tensor([rate, -fixed, optimizer, idle_speedup], dtype=torch.float64)
    if dist.is_initialized():  # the slowest rank sets the pace
        dist.all_reduce(stats, op=dist.ReduceOp.MIN)
    rate, fixed, optimizer, idle_speedup = float(stats[0]), -float(stats[1]), float(stats[2]), float(stats[3])
    intra, inter = base.intra, base.inter
    if dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        local = min(gpus_per_node, world)
        node_groups = [dist.new_group(list(range(s, s + local))) for s in range(0, world, local)]
        intra = measure_link(node_groups[dist.get_rank() // local]) if local > 1 else intra
        if world > local:
            inter = measure_link(None)
        else:
            inter = intra  # one node: nothing crosses a NIC; plans for more nodes keep this as a floor
    peak = base.peak_flops if device != "cpu" else rate
    return Topology(nodes=nodes, gpus_per_node=gpus_per_node, device=device, peak_flops=peak,
                    achieved=rate / peak, memory_bytes=base.memory_bytes, intra=intra, inter=inter,
                    overlap=0.0 if device == "cpu" else base.overlap, optimizer_bytes_per_s=optimizer,
                    microbatch_overhead_s=fixed, idle_speedup=idle_speedup if device == "cpu" else 1.0,
                    calibrated=True)


def _worker(rank: int, world: int, port: int, cfg: Any, device: str, out: str, threads: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        topo = calibrate_rank(cfg, 1, world, device)
        if rank == 0:
            with open(out, "w") as f:
                f.write(topo.to_json())
        dist.barrier()
    finally:
        dist.destroy_process_group()


def calibrate_local(cfg: Any, gpus_per_node: int, device: str = "cpu", threads: int = 1) -> Topology:
    """Calibrate one node of `gpus_per_node` local processes (gloo on loopback, this machine's CPUs)."""
    import json
    import tempfile

    import torch.multiprocessing as mp

    from phalanx.scheduler.measure import free_port

    if gpus_per_node == 1:
        torch.set_num_threads(threads)
        return calibrate_rank(cfg, 1, 1, device)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "topology.json")
        mp.spawn(_worker, args=(gpus_per_node, free_port(), cfg, device, out, threads), nprocs=gpus_per_node,
                 join=True)
        with open(out) as f:
            return Topology.from_dict(json.load(f))
