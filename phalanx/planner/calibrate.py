"""`phalanx plan --calibrate`: measure this cluster's compute, copies and links with short micro-benchmarks.

Each figure is a term of the cost model (`cost.py`), measured on its own, never a layout's step:
  * compute: forward + backward of the config's model at four token counts, each rank alone while the
    others wait; a line through (FLOPs, seconds) gives the achieved FLOP/s and a fixed cost per micro-batch
    (Python and kernel launches, which dominate small models). Then the same step with j = 1..world ranks
    computing at once: how much slower each computes (`contention`: ranks sharing CPU cores);
  * optimizer: the trainer's clip + AdamW step over the model's parameters (bytes touched per second);
  * copies: the strided copies a Ulysses all-to-all makes around the wire (pack, unpack) at the config's
    sizes, every rank at once; a line gives latency per copy and bytes per second;
  * links: latency from 4 kB all-to-alls back to back, bandwidth by least squares over all-reduces and
    all-to-alls from 4 kB to 4 MB (the alpha-beta terms of the cost model), over all ranks. All ranks of a
    one-node calibration share a node, so the inter-node link keeps the preset's numbers unless run across nodes
    under torchrun (then the ranks of one node and the whole world are fitted separately);
  * sync (CPU): a small all-to-all after each of 16 pieces of matmul against the matmuls alone: what a
    collective inside forward / backward costs beyond the wire (waiting for the slowest rank, waking up);
  * FSDP2 (CPU): a few fully_shard-ed units of Linear layers against the same layers unsharded: the fixed
    cost per all-gather / reduce-scatter beyond link and copies, and per sharded parameter in clip + AdamW.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from phalanx.planner.topology import Link, Topology, preset

SIZES = (4 << 10, 64 << 10, 512 << 10, 4 << 20)  # bytes per collective buffer
REPEATS = 8


def _timed(fn: Any, repeats: int = REPEATS, barrier: bool = True) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up, all ranks starting together (the typical
    run: see `_interleaved`)."""
    fn()
    times = []
    for _ in range(repeats):
        if barrier and dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares (intercept, slope) of y over x through `points`."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - slope * mx, slope


def _interleaved(runs: list[tuple[Any, int]], repeats: int = REPEATS, fastest: bool = False) -> list[float]:
    """Seconds of each (fn, ranks) where ranks 0..ranks-1 run fn at once, starting together, and the rest wait
    blocked (gloo waits without spinning): per repeat the slowest busy rank (as a step waits for its slowest
    rank), then the median repeat, or with `fastest` the fastest. The median for a small cost a step pays many
    times (a call, a copy): a step adds up typical ones. The fastest for a micro-batch's compute, a large share of
    a step: a step timed at its least disturbed (as benchmarks and users' best steps are) had it undisturbed too.
    The runs take turns, `repeats` rounds of all of them, so a burst of other work on a shared machine disturbs
    them alike."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    for fn, ranks in runs:  # warm-up
        if rank < ranks:
            fn()
    seconds = torch.zeros(len(runs), repeats, dtype=torch.float64)
    for r in range(repeats):
        for i, (fn, ranks) in enumerate(runs):
            if world > 1:
                dist.barrier()
            if rank < ranks:
                start = time.perf_counter()
                fn()
                seconds[i, r] = time.perf_counter() - start
    if world > 1:
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return (seconds.min(dim=1) if fastest else seconds.median(dim=1)).values.tolist()


def measure_compute(cfg: Any) -> tuple[float, float, tuple[float, ...]]:
    """(FLOP/s, fixed seconds per micro-batch, contention) of the config's model on one rank.

    Rate and fixed cost: a line through (FLOPs, seconds) of forward + backward at four token counts, one
    rank computing while the others wait. Contention: the full micro-batch with j = 2..world ranks computing
    at once, over the same step alone. All interleaved, each its fastest repeat (`_interleaved`)."""
    from phalanx.models import build_on_meta, flops_per_token, materialize

    model = materialize(build_on_meta(cfg.model), torch.device("cpu"), 0)
    B, T = cfg.train.micro_batch_size, cfg.data.seq_len

    def step_of(b: int, t: int) -> Any:
        tokens = torch.randint(0, cfg.model.vocab_size, (b, t + 1))

        def step() -> None:
            logits = model(tokens[:, :-1])
            F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()

        return step

    sizes = ((B, T), (B, max(8, T // 4)), (B, max(8, T // 2)), (2 * B, T))
    world = dist.get_world_size() if dist.is_initialized() else 1
    full = step_of(B, T)
    runs = [(step_of(b, t), 1) for b, t in sizes] + [(full, j) for j in range(2, world + 1)]
    seconds = _interleaved(runs, repeats=2 * REPEATS, fastest=True)
    fixed, slope = _line([(b * t * flops_per_token(cfg.model, t), sec) for (b, t), sec in zip(sizes, seconds)])
    slope = max(slope, 1e-15)  # seconds per FLOP
    solo = seconds[0]
    contention = (1.0, *(max(1.0, sec / solo) for sec in seconds[len(sizes):]))
    return 1.0 / slope, max(0.0, fixed), contention


def measure_optimizer(cfg: Any) -> float:
    """Bytes per second AdamW (the trainer's) and the gradient clip touch (cost.OPTIMIZER_TOUCH per parameter)."""
    from phalanx.models import build_on_meta, materialize
    from phalanx.parallel.data_parallel import clip_grad_norm
    from phalanx.trainer.optim import build_optimizer

    model = materialize(build_on_meta(cfg.model), torch.device("cpu"), 0)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def step() -> None:
        clip_grad_norm(model.parameters(), 1.0)
        optimizer.step()

    touched = sum(p.numel() for p in model.parameters()) * 32  # cost.OPTIMIZER_TOUCH bytes per parameter
    return touched / _timed(step)


def ulysses_copy_parts(b: int, tokens: int, heads: int, kv_heads: int, head_dim: int, sp: int) -> Any:
    """A function doing the copies of one Ulysses sequence-to-heads exchange (`sequence_comm.seq_to_heads`)
    without the wire: q, k, v packed into the send buffer, then copied out of it as head-sharded tensors."""
    q = torch.randn(b, tokens, heads, head_dim)
    k, v = torch.randn(b, tokens, kv_heads, head_dim), torch.randn(b, tokens, kv_heads, head_dim)
    parts = [t.unflatten(2, (sp, t.shape[2] // sp)).permute(2, 0, 1, 3, 4) for t in (q, k, v)]
    widths = [p.shape[3] for p in parts]
    send = torch.empty(sp, b, tokens, sum(widths), head_dim)

    def run() -> None:
        for dest, part in zip(send.split(widths, dim=3), parts):
            dest.copy_(part)
        for recv, w in zip(send.split(widths, dim=3), widths):
            recv.permute(1, 3, 0, 2, 4).reshape(b, w, sp * tokens, head_dim)

    return run, 2 * send.numel() * 4


def measure_copies(cfg: Any) -> Link:
    """Latency per copy and bytes per second of the strided copies around a Ulysses all-to-all (6 copies per
    exchange), at the config's sizes with every rank copying at once."""
    from phalanx.parallel.sequence import kv_repeat

    m = cfg.model
    world = dist.get_world_size() if dist.is_initialized() else 1
    sp = max(2, world)
    while m.n_heads % sp:
        sp //= 2
    sp = max(sp, 1)
    kv = m.n_kv_heads or m.n_heads
    runs, sizes = [], []
    for b in (1, cfg.train.micro_batch_size, 4 * cfg.train.micro_batch_size):
        run, nbytes = ulysses_copy_parts(b, max(1, cfg.data.seq_len // sp), m.n_heads, kv * kv_repeat(m.n_heads, kv, sp),
                                         m.d_model // m.n_heads, sp)
        runs.append((run, world))
        sizes.append(nbytes)
    samples = [(6.0, float(nbytes), sec) for nbytes, sec in zip(sizes, _interleaved(runs))]
    return _fit_link(samples)


def measure_fsdp(cfg: Any, link: Link, copy: Link, units: int = 4, layers: int = 4) -> tuple[float, float]:
    """(seconds per FSDP2 collective beyond the link and the copies, extra seconds per sharded parameter in the
    clip + AdamW step) from `units` fully_shard-ed units of `layers` Linear(d, d) each, against the same
    modules unsharded; every rank at once over the whole world."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from phalanx.parallel.data_parallel import clip_grad_norm
    from phalanx.planner.placement import collective_time
    from phalanx.planner.topology import Topology
    from phalanx.trainer.optim import build_optimizer

    n = dist.get_world_size()
    d = cfg.model.d_model
    rows = max(1, cfg.train.micro_batch_size * cfg.data.seq_len // n)
    x = torch.randn(rows, d)

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Sequential(*[torch.nn.Linear(d, d) for _ in range(layers)])
                                     for _ in range(units)])

    plain, sharded = build(), build()
    mesh = init_device_mesh("cpu", (n,))
    for unit in sharded:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(sharded, mesh=mesh)
    runs = []
    for model in (plain, sharded):
        optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))

        def forward_backward(model: torch.nn.Module = model) -> None:
            model(x).square().mean().backward()

        def step(model: torch.nn.Module = model, optimizer: Any = optimizer) -> None:
            clip_grad_norm(model.parameters(), 1.0)
            optimizer.step()

        runs += [(forward_backward, n), (step, n)]
    fwd_plain, opt_plain, fwd_sharded, opt_sharded = _interleaved(runs)
    unit_bytes = layers * (d * d + d) * 4
    topo = Topology(1, n, "cpu", 1.0, 1.0, 0.0, link, link, copy=copy)
    wire = units * (collective_time("all_gather", 2 * unit_bytes / n, 2, n, n, 1, topo)
                    + collective_time("reduce_scatter", unit_bytes, 1, n, n, 1, topo))
    copies = units * 3 * copy.latency_s + units * 3 * unit_bytes / copy.bandwidth
    per_call = max(0.0, (fwd_sharded - fwd_plain - wire - copies) / (3 * units))
    per_param = max(0.0, (opt_sharded - opt_plain) / (2 * layers * units))
    return per_call, per_param


def _fit_link(samples: list[tuple[float, float, float]], latency: Optional[float] = None) -> Link:
    """seconds = latency * hops + volume / bandwidth over (hops, volume, seconds): with `latency` given (links:
    measured on small all-to-alls), the bandwidth by least squares of what remains; a free two-parameter
    fit lets the big messages' noise swing the latency, which the many small calls of a step multiply. Without
    it (copies) both by least squares."""
    svv = sum(v * v for _, v, _ in samples)
    if latency is not None:
        inv_bw = sum(v * max(0.0, s - latency * h) for h, v, s in samples) / svv
        return Link(bandwidth=1.0 / max(inv_bw, 1e-15), latency_s=latency)
    shh = sum(h * h for h, _, _ in samples)
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
    # Latency: the smallest all-to-all (the call a critical path repeats most: sp, ep), 16 back to back, so that
    # leaving the barrier (ranks woken one by one on shared cores) is paid once, not per call.
    small, small_out = torch.zeros(SIZES[0] // 4), torch.zeros(SIZES[0] // 4)
    calls = 16

    def back_to_back() -> None:
        for _ in range(calls):
            dist.all_to_all_single(small_out, small, group=group)

    latency = _timed(back_to_back) / calls / (n - 1)
    samples = []
    for size in SIZES:
        buf = torch.zeros(size // 4)
        out = torch.empty_like(buf)
        t = _timed(lambda: dist.all_reduce(buf, group=group))
        samples.append((2 * (n - 1), 2 * size * (n - 1) / n, t))
        t = _timed(lambda: dist.all_to_all_single(out, buf, group=group))
        samples.append((n - 1, size * (n - 1) / n, t))
    # every rank fits its own numbers; the slowest rank's view is the one a collective waits for
    fitted = _fit_link(samples, latency)
    worst = torch.tensor([1.0 / fitted.bandwidth, fitted.latency_s], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return Link(bandwidth=1.0 / float(worst[0]), latency_s=float(worst[1]))


def measure_sync(cfg: Any) -> float:
    """Seconds a collective costs inside a forward / backward beyond its alpha-beta time: between collectives the
    ranks compute, and each arrives when its share of the (shared) cores let it, so every call waits for the
    slowest rank and wakes blocked ones. Measured in place: 16 pieces of the model's matmuls with a small
    all-to-all after each, against the same matmuls alone and the all-to-alls back to back (their latency is
    the link's); every rank at once over the whole world."""
    n = dist.get_world_size()
    d = cfg.model.d_model
    rows = max(1, cfg.train.micro_batch_size * cfg.data.seq_len // n)
    x, w = torch.randn(rows, d), torch.randn(d, d)
    small, out = torch.zeros(64 * n), torch.zeros(64 * n)
    calls = 16

    def compute() -> None:
        for _ in range(4):
            x @ w

    def alone() -> None:
        for _ in range(calls):
            compute()

    def synced() -> None:
        for _ in range(calls):
            compute()
            dist.all_to_all_single(out, small)

    def bare() -> None:
        for _ in range(calls):
            dist.all_to_all_single(out, small)

    t_alone, t_synced, t_bare = _interleaved([(alone, n), (synced, n), (bare, n)], repeats=2 * REPEATS)
    return max(0.0, (t_synced - t_alone - t_bare) / calls)


def calibrate_rank(cfg: Any, nodes: int, gpus_per_node: int, device: str) -> Topology:
    """Run on every rank of the cluster (process group initialised); returns the measured topology."""
    base = preset(device, nodes=nodes, gpus_per_node=gpus_per_node, dtype=cfg.train.dtype)
    rate, fixed, contention = measure_compute(cfg)
    optimizer = measure_optimizer(cfg)
    copy = measure_copies(cfg)
    # the slowest rank sets the pace: lowest rates, highest costs
    stats = torch.tensor([rate, -fixed, optimizer, copy.bandwidth, -copy.latency_s], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.MIN)
    rate, fixed, optimizer = float(stats[0]), -float(stats[1]), float(stats[2])
    copy = Link(float(stats[3]), -float(stats[4]))
    intra, inter = base.intra, base.inter
    fsdp_call, fsdp_param, sync = 0.0, 0.0, 0.0
    if dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        local = min(gpus_per_node, world)
        node_groups = [dist.new_group(list(range(s, s + local))) for s in range(0, world, local)]
        intra = measure_link(node_groups[dist.get_rank() // local]) if local > 1 else intra
        if world > local:
            inter = measure_link(None)
        else:
            inter = intra  # one node: nothing crosses a NIC; plans for more nodes keep this as a floor
        if device == "cpu":
            fsdp = torch.tensor([*measure_fsdp(cfg, intra, copy), measure_sync(cfg)], dtype=torch.float64)
            dist.all_reduce(fsdp, op=dist.ReduceOp.MAX)
            fsdp_call, fsdp_param, sync = float(fsdp[0]), float(fsdp[1]), float(fsdp[2])
    peak = base.peak_flops if device != "cpu" else rate
    cpu = device == "cpu"
    return Topology(nodes=nodes, gpus_per_node=gpus_per_node, device=device, peak_flops=peak,
                    achieved=rate / peak, memory_bytes=base.memory_bytes, intra=intra, inter=inter,
                    overlap=0.0 if cpu else base.overlap, optimizer_bytes_per_s=optimizer,
                    microbatch_overhead_s=fixed, contention=contention if cpu else (),
                    copy=copy if cpu else base.copy, fsdp_call_s=fsdp_call, fsdp_param_s=fsdp_param, sync_s=sync,
                    calibrated=True)


def _calibrate_local_rank(cfg: Any, device: str) -> str:
    """One local rank of `calibrate_local` (RANK and WORLD_SIZE set by the pool): its topology as JSON."""
    from phalanx.parallel.dist import rendezvous_store

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            store=rendezvous_store(rank, world, datetime.timedelta(seconds=300)))
    try:
        topo = calibrate_rank(cfg, 1, world, device)
        dist.barrier()
        return topo.to_json()
    finally:
        dist.destroy_process_group()


def calibrate_local(cfg: Any, gpus_per_node: int, device: str = "cpu", threads: int = 1) -> Topology:
    """Calibrate one node of `gpus_per_node` local processes (gloo on loopback, this machine's CPUs)."""
    import json

    from phalanx.parallel.local_ranks import run_local

    if gpus_per_node == 1:
        torch.set_num_threads(threads)
        return calibrate_rank(cfg, 1, 1, device)
    return Topology.from_dict(json.loads(run_local(_calibrate_local_rank, gpus_per_node, cfg, device,
                                                   threads=threads)))
