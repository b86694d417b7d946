"""`events.jsonl` and `metrics.jsonl`: the one writer and reader of a run's JSON-lines files.

A line is one JSON object. A reader meets lines that are not: the torn last line of a process killed
mid-write, or whatever else found its way into a shared run folder. Those are skipped with one
warning naming the file and line, never a traceback; a line longer than `MAX_LINE` bytes is skipped
without being read whole, so no file makes a reader hold more than a line's bound.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Any, Iterator, Optional

EVENTS = "events.jsonl"
MAX_LINE = 1 << 20


def append_event(run_dir: str, event: str, **fields: Any) -> None:
    """One line in `events.jsonl`: starts, resumes, checkpoints, failures, recoveries, ends."""
    with open(os.path.join(run_dir, EVENTS), "a") as f:
        f.write(json.dumps({"time": time.time(), "event": event, **fields}) + "\n")


def _records(path: str) -> Iterator[dict[str, Any]]:
    bad: list[int] = []
    with open(path, "rb") as f:
        number = 0
        while line := f.readline(MAX_LINE + 1):
            number += 1
            if len(line) > MAX_LINE and not line.endswith(b"\n"):
                bad.append(number)
                while (rest := f.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                    pass  # the rest of an oversized line, read in bounded pieces
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                yield record
            else:
                bad.append(number)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warnings.warn(f"{path}: skipped line {shown}: not a JSON object (a torn write or a foreign line)",
                      RuntimeWarning, stacklevel=3)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Every readable record of a JSON-lines file ([] when it does not exist)."""
    if not os.path.exists(path):
        return []
    return list(_records(path))


def read_events(run_dir: str, since: Optional[float] = None, kinds: Optional[set[str]] = None) -> list[dict[str, Any]]:
    """The run's events at or after `since`, of `kinds` when given."""
    return [e for e in read_jsonl(os.path.join(run_dir, EVENTS))
            if isinstance(e.get("time"), (int, float)) and isinstance(e.get("event"), str)
            and (since is None or e["time"] >= since) and (kinds is None or e["event"] in kinds)]
