"""Rank placement: which mesh dimension varies fastest over the global ranks.

Ranks are numbered node by node (torchrun's and Slurm's order), so the innermost mesh dimension's
groups share a node and the outer ones cross nodes. phalanx's default (pp, dp, sp) keeps Ulysses
inside a node; with FSDP the dp all-gathers can outweigh it, and pp's few point-to-point sends are
almost always the lightest. C4 (arXiv:2406.04594) and the Frontier study (arXiv:2312.12705) both
gain by planning exactly this: the heavy, predictable flows on the fastest links. `best_order`
costs every permutation with the topology's two link levels and keeps the cheapest.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Optional

from phalanx.parallel.layout import Layout, parse_order
from phalanx.parallel.mesh import MESH_ORDER
from phalanx.planner.topology import Topology


def span(ranks: list[int], gpus_per_node: int) -> tuple[int, int]:
    """(ranks per node, nodes) of a group, ranks numbered node by node."""
    nodes = len({r // gpus_per_node for r in ranks})
    return max(1, len(ranks) // nodes), nodes


def collective_time(kind: str, nbytes: float, calls: int, n: int, per_node: int, nodes: int, topo: Topology) -> float:
    """alpha-beta time of `calls` collectives moving `nbytes` in all (comm.py's input-buffer convention)
    over a group of n ranks, `per_node` of them on each of `nodes` nodes; ring within each level and
    hierarchical across them (NCCL's ring/tree over NVLink then NICs)."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    intra, inter = topo.intra, topo.inter
    k, m = per_node, nodes
    if kind == "send":
        link = inter if m > 1 else intra
        return calls * link.latency_s + nbytes / link.bandwidth
    if kind == "all_to_all":
        # each rank's buffer splits n ways: (k-1)/n of it to node peers, (n-k)/n over the NIC, concurrently
        t = max(nbytes * (k - 1) / n / intra.bandwidth, nbytes * (n - k) / n / inter.bandwidth)
        return t + calls * ((k - 1) * intra.latency_s + (n - k) * inter.latency_s)
    total = nbytes * n if kind == "all_gather" else nbytes  # the data every rank ends up moving
    ring = (total * (k - 1) / k / intra.bandwidth if k > 1 else 0.0) + \
           (total / k * (m - 1) / m / inter.bandwidth if m > 1 else 0.0)
    hops = (k - 1) * intra.latency_s + (m - 1) * inter.latency_s
    factor = 2 if kind == "all_reduce" else 1  # reduce-scatter + all-gather
    return factor * (ring + calls * hops)


def critical_ranks(layout: Layout) -> list[int]:
    """The pipeline ranks that bound a step: the first (embedding, most micro-batches in flight), the last
    (head, loss) and one in between (balanced splits make the others alike)."""
    return sorted({0, min(1, layout.pp - 1), layout.pp - 1})


def comm_times(cfg: Any, layout: Layout, topo: Topology, traffic: Optional[dict] = None) -> dict[str, float]:
    """Seconds per step per "kind/dim" on the most loaded pipeline rank, with the layout's rank order."""
    from phalanx.planner.traffic import step_traffic

    spans = {}
    worst: dict[str, float] = {}
    traffic = traffic if traffic is not None else {r: step_traffic(cfg, layout, r) for r in critical_ranks(layout)}
    for flows in traffic.values():
        for key, flow in flows.items():
            kind, dim = key.split("/")
            if dim not in spans:
                ranks = layout.group_ranks(dim)
                spans[dim] = (len(ranks), *span(ranks, topo.gpus_per_node))
            n, k, m = spans[dim]
            calls = flow.calls if flow.calls is not None else max(1, math.ceil(flow.bytes / 25e6))  # DDP's buckets
            worst[key] = max(worst.get(key, 0.0), collective_time(kind, flow.bytes, calls, n, k, m, topo))
    return worst


def best_order(cfg: Any, layout: Layout, topo: Topology) -> tuple[str, ...]:
    """The rank order (outermost first) with the least communication time; ties keep phalanx's default."""
    from phalanx.planner.traffic import step_traffic

    traffic = {r: step_traffic(cfg, layout, r) for r in critical_ranks(layout)}
    best, best_t = MESH_ORDER, sum(comm_times(cfg, layout.with_(order=MESH_ORDER), topo, traffic).values())
    for order in itertools.permutations(MESH_ORDER):
        t = sum(comm_times(cfg, layout.with_(order=order), topo, traffic).values())
        if t < best_t * (1 - 1e-9):
            best, best_t = order, t
    return best


def mesh_order(cfg: Any, world_size: int, gpus_per_node: int) -> tuple[str, ...]:
    """The rank order a run uses: `parallel.order` as given, or under auto the planner's best order for
    this layout on a cluster of world_size / gpus_per_node nodes with preset link speeds."""
    order = parse_order(cfg.parallel.order)
    if order is not None:
        return order
    from phalanx.planner.topology import preset

    gpus = max(1, min(gpus_per_node, world_size))
    if world_size % gpus or world_size == gpus:
        return MESH_ORDER  # one node (or an uneven one): every order costs the same
    topo = preset(nodes=world_size // gpus, gpus_per_node=gpus, dtype=cfg.train.dtype)
    return best_order(cfg, Layout.from_config(cfg), topo)
