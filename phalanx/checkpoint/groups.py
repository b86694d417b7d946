"""Erasure groups: which ranks' snapshot blocks are coded together, and which nodes hold the parity.

A group is up to k data blocks from k distinct nodes plus m parity blocks on m other nodes, so
losing any m nodes loses at most m blocks of every group (the REFT / Gemini placement rule).
Ranks are taken round-robin over nodes (local rank 0 of every node, then local rank 1, ...), which
puts consecutive ranks on distinct nodes; a last group with fewer than k members is coded as if
the missing members were zero blocks. Parity holders rotate with the group id to spread memory.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ErasureGroup:
    gid: int
    members: tuple[int, ...]  # data ranks, in codec index order
    parity_nodes: tuple[int, ...]  # node of parity block j


def erasure_groups(node_of_rank: list[int], k: int, m: int) -> tuple[list[ErasureGroup], str]:
    """(groups, reason): no groups, with the reason, when the cluster has too few nodes for k + m."""
    nodes = sorted(set(node_of_rank))
    if m == 0:
        return [], "checkpoint.erasure_m=0: snapshots live in each node's keeper only"
    if len(nodes) < k + m:
        return [], (f"erasure coding k={k}, m={m} needs {k + m} nodes and this run has {len(nodes)}: snapshots "
                    f"survive process crashes (keeper) but not the loss of a node")
    by_node = {n: [r for r, rn in enumerate(node_of_rank) if rn == n] for n in nodes}
    order = [by_node[n][i] for i in range(max(len(v) for v in by_node.values())) for n in nodes if i < len(by_node[n])]
    groups: list[list[int]] = []
    pending = list(order)
    while pending:
        group, used = [], set()
        for rank in list(pending):
            if node_of_rank[rank] not in used:
                group.append(rank)
                used.add(node_of_rank[rank])
                pending.remove(rank)
                if len(group) == k:
                    break
        groups.append(group)
    out = []
    for gid, members in enumerate(groups):
        member_nodes = {node_of_rank[r] for r in members}
        start = (gid * m) % len(nodes)
        rotated = nodes[start:] + nodes[:start]
        parity = tuple(n for n in rotated if n not in member_nodes)[:m]
        if len(parity) < m:  # cannot happen when nodes >= k + m; kept as a guard for future layouts
            raise AssertionError(f"group {members} has no {m} parity nodes outside {sorted(member_nodes)}")
        out.append(ErasureGroup(gid, tuple(members), parity))
    return out, f"erasure coding k={k}, m={m}: {len(out)} groups over {len(nodes)} nodes"
