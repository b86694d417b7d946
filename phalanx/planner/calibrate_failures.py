"""`phalanx plan --failures --calibrate`: this machine's recovery rates, measured with the real code paths.

  * snapshot: the config's model and AdamW state packed into a shared-memory block by the checkpoint's own
    `FlatLayout` (what a snapshot copies into its keeper slot): bytes per second, and the launch (state listing);
  * decode: `ErasureCodec` (k=2, m=1) rebuilding a lost data block of up to 64 MiB of that state;
  * storage: one rank's block written by `CheckpointStore.write_rank` (the keepers' persist) to a temporary folder;
  * restart: a new Python process importing torch and phalanx (what every restarted rank pays first).
On a CPU the snapshot copy shares the training's cores, so all of its time shows in the step.

Saved terms (`save_terms`, JSON) are reused with `phalanx plan --failures --terms FILE`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, fields
from typing import Any, Callable

from phalanx.errors import ConfigError
from phalanx.planner.goodput import ClusterPreset, RecoveryTerms


def _fastest(fn: Callable[[], Any], repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _model_state(cfg: Any) -> dict[str, Any]:
    import torch

    from phalanx.models import build_on_meta, materialize
    from phalanx.trainer.optim import build_optimizer

    model = materialize(build_on_meta(cfg.model), torch.device("cpu"), 0)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW's moments exist from the first step on
    return {"model": model.state_dict(), "optim": optimizer.state_dict()}


def measure_restart_s(repeats: int = 2) -> float:
    """Seconds for a new Python process to import torch and phalanx (the fastest of `repeats`)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        # a restarted rank finds its modules' bytecode cached, whatever this shell says about writing it
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        subprocess.run([sys.executable, "-c", "import torch, phalanx"], check=True, env=env)
        best = min(best, time.perf_counter() - start)
    return best


def calibrate_failures(cfg: Any, replan_s: float) -> ClusterPreset:
    """This machine's rates as a `ClusterPreset` (the restart of a whole job is a restart of its processes here)."""
    import torch

    from phalanx.checkpoint.erasure import ErasureCodec, split_blocks
    from phalanx.checkpoint.flat import FlatLayout
    from phalanx.checkpoint.persistent import CheckpointStore, persist_plan

    state = _model_state(cfg)
    layout = FlatLayout.of(state)
    block = torch.empty(layout.nbytes, dtype=torch.uint8).share_memory_()
    copy_s = _fastest(lambda: layout.pack(block, state))
    launch_s = _fastest(lambda: (layout.matches(state), layout.tensors(state)))
    sample = block[: min(layout.nbytes, 64 << 20)]
    codec = ErasureCodec(2, 1)
    data = split_blocks(sample, 2)
    parity = codec.encode(data)
    decode_s = _fastest(lambda: codec.decode({1: data[1], 2: parity[0]}))
    plan = persist_plan(state, layout, (), 0, lambda x: [x])
    with tempfile.TemporaryDirectory(prefix="phalanx-calibrate-") as tmp:
        store = CheckpointStore(tmp, key=None)
        view = memoryview(block.numpy())
        step = iter(range(1, 100))
        persist_s = _fastest(lambda: store.write_rank(next(step), 0, view, plan), repeats=2)
    restart_s = measure_restart_s()
    return ClusterPreset(name="calibrated", host_copy_bytes_per_s=layout.nbytes / copy_s, snapshot_launch_s=launch_s,
                         snapshot_interference=1.0, decode_bytes_per_s=sample.numel() / decode_s,
                         storage_bytes_per_s=layout.nbytes / persist_s, restart_s=restart_s, restart_job_s=restart_s,
                         replan_s=replan_s)


def save_terms(terms: RecoveryTerms, path: str) -> str:
    """Write `terms` as JSON to `path` (folders created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(asdict(terms), f, indent=2)
        f.write("\n")
    return path


def load_terms(path: str) -> RecoveryTerms:
    """Terms saved by `save_terms` (`phalanx plan --failures --calibrate`)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--terms file '{path}' does not exist; create it with `phalanx plan CONFIG --failures "
                          f"--calibrate`")
    try:
        with open(path) as f:
            data = json.load(f)
        names = {f.name for f in fields(RecoveryTerms)}
        return RecoveryTerms(**{k: v for k, v in data.items() if k in names})
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--terms file '{path}' is not saved recovery terms ({err}); recreate it with "
                          f"`phalanx plan CONFIG --failures --calibrate`") from None
