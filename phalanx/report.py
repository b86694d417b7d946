"""`phalanx report RUN_DIR`: a loss plot (PNG) and a summary from metrics.jsonl and events.jsonl."""

from __future__ import annotations

import json
import os

from phalanx.errors import PhalanxError


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_metrics(run_dir: str) -> list[dict]:
    """One record per step; after a resume the replayed steps replace the ones logged before the kill."""
    by_step = {m["step"]: m for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))}
    return [by_step[s] for s in sorted(by_step)]


def report(run_dir: str) -> str:
    metrics = step_metrics(run_dir)
    if not metrics:
        raise PhalanxError(f"'{run_dir}' has no metrics.jsonl with steps; pass a run directory such as runs/tiny")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, (ax_loss, ax_tput) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, [m["loss"] for m in metrics], label="train")
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
    if val:
        ax_loss.plot(*zip(*val), "o-", label="validation")
    events = read_jsonl(os.path.join(run_dir, "events.jsonl"))
    for event in events:
        if event["event"] in ("resume", "interrupted"):
            ax_loss.axvline(event["step"], color="grey", linestyle=":", linewidth=1)
    ax_loss.set(xlabel="step", ylabel="loss", title=f"{os.path.basename(run_dir.rstrip('/'))}: loss")
    ax_loss.legend()
    ax_tput.plot(steps, [m["tokens_per_s"] for m in metrics])
    ax_tput.set(xlabel="step", ylabel="tokens/s", title="throughput")
    fig.tight_layout()
    out = os.path.join(run_dir, "loss.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)

    first, last = metrics[0], metrics[-1]
    resumes = sum(e["event"] == "resume" for e in events)
    lines = [
        f"run {run_dir}: {len(metrics)} steps logged, last step {last['step']}",
        f"loss {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']}), "
        f"{last['loss'] / first['loss'] * 100:.1f}% of the first",
        f"throughput {last['tokens_per_s']:,.0f} tokens/s; resumes {resumes}",
        f"plot: {out}",
    ]
    return "\n".join(lines)
