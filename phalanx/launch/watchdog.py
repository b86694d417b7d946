"""The controller's judgement over heartbeats: who hangs, who straggles (pure functions, no Ray).

Every rank runs the same program, so its n-th collective is everyone's n-th collective. When ranks
have waited in collective n longer than the timeout, the faulty ranks are the ones that never
entered n — they are named, not the ones waiting for them (C4's insight). A straggler is a rank
whose busy time per step (step time minus time spent waiting in collectives) exceeds the other
ranks' median by `factor` for `steps` consecutive steps: the others' waiting is its slowness.
"""

from __future__ import annotations

import statistics
from typing import Any, Optional


def find_hang(beats: dict[int, dict[str, Any]], now: float, timeout_s: float) -> Optional[dict[str, Any]]:
    """None, or {"collective", "seq", "waiting", "culprits", "where"} when a collective exceeded the timeout."""
    waiting = {r: b for r, b in beats.items() if b.get("in_collective")
               and now - b["in_collective"]["since"] > timeout_s}
    if not waiting:
        return None
    seq = min(b["in_collective"]["seq"] for b in waiting.values())
    name = next(b["in_collective"]["name"] for b in waiting.values() if b["in_collective"]["seq"] == seq)
    stuck = sorted(r for r, b in waiting.items() if b["in_collective"]["seq"] == seq)
    culprits = sorted(r for r, b in beats.items() if b["seq"] < seq)
    if not culprits:  # everyone entered: whoever is not waiting in it
        culprits = sorted(r for r in beats if r not in stuck)
    return {"collective": name, "seq": seq, "waiting": stuck, "culprits": culprits,
            "where": {r: {"step": beats[r]["step"], "phase": beats[r]["phase"], "seq": beats[r]["seq"]}
                      for r in culprits}}


def find_stragglers(beats: dict[int, dict[str, Any]], factor: float, steps: int) -> list[dict[str, Any]]:
    """Ranks busier than `factor` x the median busy time on each of the last `steps` steps all ranks share."""
    busy: dict[int, dict[int, float]] = {r: {s: max(0.0, sec - wait) for s, sec, wait in b.get("recent", [])}
                                         for r, b in beats.items()}
    common = sorted(set.intersection(*(set(v) for v in busy.values()))) if busy else []
    if len(common) < steps or len(busy) < 2:
        return []
    last = common[-steps:]
    out = []
    for rank, per_step in busy.items():
        # The median of the *other* ranks: with two ranks, a median including the straggler is half its own time.
        medians = [statistics.median(busy[r][step] for r in busy if r != rank) for step in last]
        if all(m > 0 and per_step[step] >= factor * m for step, m in zip(last, medians)):
            out.append({"rank": rank, "busy_s": sum(per_step[s] for s in last) / steps,
                        "median_busy_s": sum(medians) / steps, "steps": last})
    return out
