"""Trackers: where step metrics go. Console (progress bar or plain lines), JSONL, wandb.

Only rank 0 builds trackers. wandb is imported only when enabled, and its run id lives in the
trainer state so a resumed run continues the same wandb run.
"""

from __future__ import annotations

import json
import secrets
import sys
from typing import Any, Optional, Protocol

from phalanx.trainer.metrics import format_step_line


class Tracker(Protocol):
    def log(self, metrics: dict) -> None: ...

    def close(self) -> None: ...


class ConsoleTracker:
    """A tqdm bar over the steps on a TTY (lines printed above it), plain lines otherwise."""

    def __init__(self, mode: str, total_steps: int, start_step: int, stream: Any = None):
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=self.stream)

    def log(self, metrics: dict) -> None:
        if self.mode == "none":
            return
        line = format_step_line(metrics)
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            self.bar.update(metrics["step"] - self.bar.n)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class JsonlTracker:
    """Appends one JSON object per logged step to `metrics.jsonl` (a resumed run appends too)."""

    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)

    def log(self, metrics: dict) -> None:
        self.file.write(json.dumps(metrics) + "\n")

    def close(self) -> None:
        self.file.close()


class WandbTracker:
    """wandb on rank 0; `run_id` resumes the same wandb run after a restart."""

    def __init__(self, mode: str, project: str, name: str, run_dir: str, config: dict, run_id: Optional[str]):
        import wandb  # heavy: imported only when a run asks for it

        self.wandb = wandb
        self.run = wandb.init(
            project=project, name=name, id=run_id or secrets.token_hex(4), resume="allow", mode=mode,
            dir=run_dir, config=config, settings=wandb.Settings(silent=True, console="off"),
        )
        self.run_id = self.run.id

    def log(self, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if v is not None and k != "step"}, step=metrics["step"])

    def close(self) -> None:
        self.run.finish()


def open_trackers(cfg: Any, run_dir: str, start_step: int, wandb_run_id: Optional[str]
                  ) -> tuple[list[Tracker], Optional[str]]:
    """Rank 0's trackers for a launch that starts after `start_step`, and the wandb run id they continue."""
    log = cfg.log
    trackers: list[Tracker] = [ConsoleTracker(log.progress, cfg.train.steps, start_step),
                               JsonlTracker(f"{run_dir}/metrics.jsonl")]
    if log.wandb != "disabled":
        from omegaconf import OmegaConf

        wandb = WandbTracker(log.wandb, log.wandb_project, cfg.run.name, run_dir,
                             OmegaConf.to_container(OmegaConf.structured(cfg)), wandb_run_id)
        wandb_run_id = wandb.run_id
        trackers.append(wandb)
    return trackers, wandb_run_id
