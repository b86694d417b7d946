"""`phalanx report RUN_DIR`: loss and throughput curves with failure and recovery marks (PNG), a
summary and the recovery table, from metrics.jsonl and events.jsonl.

Where a mark goes: an injected fault at the step its victim had finished; a failure at the newest step
reached before it (the restored step plus the steps lost of its `recovery` event, or a newer step an
event recorded before it); training resumed at the restored step (the next logged step is the first
after recovery). A failure that struck while the previous one was being recovered ends that recovery:
the later failure's `recovery` answers both. Plain relaunches (`resume` without a controller's failure)
and stop requests (`interrupted`) are marked too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from phalanx.errors import PhalanxError
from phalanx.events import read_events, read_jsonl
from phalanx.goodput_measure import ettr_line, measured_ettr

PLOT = "loss.png"  # loss and throughput, side by side (README names it)
# kind -> (colour, line style, line width, legend). Marks often share a step (a kill at step 8 is detected
# at 8 and resumed from 8): the wide pale green line shows under the thin red ones.
STYLES = {
    "recovered": ("tab:green", "-", 4.0, "resumed after recovery"),
    "failure": ("tab:red", "-", 1.3, "failure detected"),
    "fault": ("black", "--", 1.0, "fault injected"),
    "interrupted": ("grey", ":", 1.3, "stopped by signal"),
    "resumed": ("tab:blue", "-.", 1.3, "relaunched (resume)"),
    "resized": ("tab:purple", "--", 2.0, "resized (elastic)"),
}


@dataclass(frozen=True)
class Mark:
    """A vertical line on the curves: at `step`, of `kind` (a key of STYLES), with a short label."""

    step: int
    kind: str
    label: str


def step_metrics(run_dir: str) -> list[dict]:
    """One record per step; after a resume the replayed steps replace the ones logged before the kill."""
    by_step = {m["step"]: m for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if type(m.get("step")) is int}
    return [by_step[s] for s in sorted(by_step)]


def _outcome(failure: dict, events: list[dict]) -> tuple[Optional[dict], str, float]:
    """(its `recovery` event or None, what became of it, when its recovery window ended): recovered;
    interrupted by the next failure (a failure during recovery); or not recovered (the controller gave up)."""
    later = [e for e in events if e["time"] >= failure["time"] and e is not failure]
    for event in later:
        if event["event"] == "recovery" and event.get("detected_at") == failure.get("detected_at"):
            return event, "recovered", event["time"]
        if event["event"] == "failure":
            return None, "recovery interrupted by the next failure", event["time"]
        if event["event"] == "gave_up":
            return None, "not recovered", event["time"]
    return None, "not recovered", float("inf")


def _step_before(events: list[dict], when: float) -> Optional[int]:
    """The newest step any event recorded up to `when`."""
    steps = [e["step"] for e in events if e["time"] <= when and isinstance(e.get("step"), int)]
    return max(steps) if steps else None


def marks(events: list[dict]) -> list[Mark]:
    """Failure and recovery marks of a run's events, in time order."""
    out: list[Mark] = []
    windows: list[tuple[float, float]] = []  # failure -> its end: the trainers' `resume` inside is the recovery
    for event in events:
        kind = event["event"]
        if kind == "fault_injected":
            label = (f"node {event['node']} lost" if event.get("kind") == "node"
                     else f"{event.get('kind', 'fault')} rank {event.get('rank')}")
            out.append(Mark(event["step"], "fault", label))
        elif kind == "failure":
            recovery, outcome, end = _outcome(event, events)
            windows.append((event["time"], end))
            what = (f"{event['cause']} (rank {','.join(map(str, event['ranks']))})" if event["ranks"] else
                    f"{event['cause']}: {event.get('detail', '')}")
            # The controller counts steps from heartbeats, which may miss the last step before a kill.
            reached = max(recovery["step"] + recovery["steps_lost"] if recovery else 0,
                          _step_before(events, event["time"]) or 0)
            out.append(Mark(reached, "failure", what if recovery else f"{what}, {outcome}"))
            if recovery is not None:
                out.append(Mark(recovery["step"], "recovered",
                                f"from {recovery['restored_from']}, {recovery['downtime_s']:.1f}s down"))
        elif kind == "resize":
            out.append(Mark(event["step"], "resized", f"{event['from_workers']} -> {event['to_workers']} workers "
                                                      f"({event['to_layout']})"))
        elif kind == "interrupted":
            out.append(Mark(event["step"], "interrupted", "stopped"))
        elif kind == "resume" and not any(start <= event["time"] <= end for start, end in windows):
            out.append(Mark(event["step"], "resumed", f"resumed at step {event['step']}"))
    return out


def recovery_table(events: list[dict]) -> list[str]:
    """One row per recovery (and per failure the run did not recover from), columns aligned."""
    header = ("cause", "ranks", "nodes", "restored from", "step", "steps lost", "downtime s", "detect s",
              "restart s", "restore s", "first step s")
    rows: list[tuple[str, ...]] = []
    for event in events:
        if event["event"] == "recovery":
            rows.append((event["cause"], _ints(event["ranks"]), _ints(event["nodes"]), event["restored_from"],
                         str(event["step"]), str(event["steps_lost"]),
                         *(f"{event[k]:.2f}" for k in ("downtime_s", "detect_s", "restart_s", "restore_s",
                                                       "first_step_s"))))
        elif event["event"] == "failure":
            recovery, outcome, _ = _outcome(event, events)
            if recovery is None:
                rows.append((event["cause"], _ints(event["ranks"]), _ints(event["nodes"]), outcome,
                             *("-" for _ in header[4:])))
    if not rows:
        return ["recoveries: none"]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    line = lambda cells: "  " + " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    lines = [f"recoveries: {sum(e['event'] == 'recovery' for e in events)}", line(header),
             "  " + "-+-".join("-" * w for w in widths)]
    lines += [line(r) for r in rows]
    lines += [f"  gave up: {e['message']}" for e in events if e["event"] == "gave_up"]
    return lines


def _ints(values: list[int]) -> str:
    return ",".join(map(str, values))


def plot(run_dir: str, metrics: list[dict], run_marks: list[Mark]) -> str:
    """Loss and throughput against step, every mark on both; returns the PNG's path."""
    try:
        import matplotlib
    except ImportError:
        raise PhalanxError("phalanx report draws with matplotlib, which is not installed; "
                           "install it with `pip install matplotlib` (a dependency of phalanx)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    steps = [m["step"] for m in metrics]
    fig, (ax_loss, ax_tput) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_loss.plot(steps, [m["loss"] for m in metrics], label="train")
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
    if val:
        ax_loss.plot(*zip(*val), "o-", label="validation")
    ax_tput.plot(steps, [m["tokens_per_s"] for m in metrics], ".-", label="tokens/s")
    for ax in (ax_loss, ax_tput):
        for mark in run_marks:
            colour, style, width, _ = STYLES[mark.kind]
            ax.axvline(mark.step, color=colour, linestyle=style, linewidth=width, alpha=0.5 if width > 2 else 1.0,
                       zorder=1 if width > 2 else 3)
    for i, mark in enumerate(run_marks):  # labels on the loss plot, staggered so equal steps stay readable
        ax_loss.annotate(mark.label, (mark.step, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(3, -12 - 11 * (i % 4)), textcoords="offset points", fontsize=7,
                         color=STYLES[mark.kind][0])
    name = os.path.basename(run_dir.rstrip("/"))
    ax_loss.set(xlabel="step", ylabel="loss", title=f"{name}: loss")
    ax_tput.set(xlabel="step", ylabel="tokens/s", title=f"{name}: throughput")
    kinds = [k for k in STYLES if any(m.kind == k for m in run_marks)]
    handles = [*ax_loss.get_lines()[:1 + bool(val)], *ax_tput.get_lines()[:1],
               *(Line2D([], [], color=STYLES[k][0], linestyle=STYLES[k][1], linewidth=min(STYLES[k][2], 2.5))
                 for k in kinds)]
    labels = ["train loss", *(["validation loss"] if val else []), "tokens/s", *(STYLES[k][3] for k in kinds)]
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    out = os.path.join(run_dir, PLOT)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def report(run_dir: str) -> str:
    """Draws the plot into the run directory; returns the summary and the recovery table."""
    metrics = step_metrics(run_dir)
    if not metrics:
        raise PhalanxError(f"'{run_dir}' has no metrics.jsonl with steps; pass a run directory such as runs/tiny")
    events = read_events(run_dir)
    run_marks = marks(events)
    out = plot(run_dir, metrics, run_marks)

    first, last = metrics[0], metrics[-1]
    resumes = sum(e["event"] == "resume" for e in events)
    failures = sum(e["event"] == "failure" for e in events)
    lines = [
        f"run {run_dir}: {len(metrics)} steps logged, last step {last['step']}",
        f"loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']}), "
        f"{last['loss'] / first['loss'] * 100:.1f}% of the first",
        f"throughput {last['tokens_per_s']:,.0f} tokens/s; resumes {resumes}; failures {failures}",
        *([ettr_line(measured_ettr(run_dir))] if any("time" in m for m in metrics) else []),
        *recovery_table(events),
        f"plot: {out}",
    ]
    return "\n".join(lines)
