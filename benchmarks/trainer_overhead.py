"""Trainer overhead: phalanx's full training step against a hand-written PyTorch loop, in one run.

Both train the same GPT (same init, same AdamW, warmup + cosine LR, gradient clipping, same
batch size and autocast). The anchor loop reuses one pre-built batch and reads the loss every
step, as a minimal script would; phalanx's step is measured end to end inside `Trainer.fit`:
drawing the batch, forward/backward, clipping, optimizer, metrics and trackers (JSONL), and the in-memory
snapshot after each step (checkpoint.snapshot_every=1, the default; the final persist is left out).
Rounds alternate between the two so machine noise hits both; medians are compared.

    python benchmarks/trainer_overhead.py                 # CPU shape (this machine)
    python benchmarks/trainer_overhead.py --preset gpt-1.3b --compile   # the GPU shape
    python benchmarks/trainer_overhead.py --quick         # a tiny GPT, one short round: checks it runs

Last line: JSON with `speedup` = anchor step time / phalanx step time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from phalanx.config import load_config  # noqa: E402
from phalanx.models import build_on_meta, flops_per_token, materialize  # noqa: E402
from phalanx.parallel import validate  # noqa: E402
from phalanx.parallel.dist import DistContext, pick_device  # noqa: E402
from phalanx.trainer import Trainer  # noqa: E402
from phalanx.trainer.metrics import peak_flops  # noqa: E402
from phalanx.trainer.optim import build_optimizer, build_schedule  # noqa: E402
from phalanx.trainer.rundir import prepare_run_dir  # noqa: E402

PRESETS = {
    # A GPT big enough that a CPU step takes ~0.1-0.3 s: overhead shows, noise does not dominate.
    "cpu": ["model.d_model=256", "model.n_layers=4", "model.n_heads=8", "model.max_seq_len=256",
            "data.seq_len=256", "train.batch_size=8", "train.micro_batch_size=8", "model.vocab_size=256"],
    # The GPU shape: 1.3B parameters (24 layers, d=2048, 16 heads, seq 2048, batch 8, bf16).
    "gpt-1.3b": ["model.d_model=2048", "model.n_layers=24", "model.n_heads=16", "model.max_seq_len=2048",
                 "data.seq_len=2048", "train.batch_size=8", "train.micro_batch_size=8", "model.vocab_size=32000",
                 "train.dtype=bf16"],
    # --quick: a GPT small enough that both sides build and run in a second or two (not a result).
    "tiny": ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=32", "data.seq_len=32",
             "train.batch_size=4", "train.micro_batch_size=4", "model.vocab_size=256"],
}
# --quick: the tiny shape, one round of a few steps; every default can still be overridden.
QUICK = {"preset": "tiny", "steps": 4, "warmup": 1, "rounds": 1}


def phalanx_steps(overrides: list[str], steps: int, warmup: int) -> list[float]:
    """Seconds per step of `Trainer.fit`, measured between consecutive step hooks."""
    with tempfile.TemporaryDirectory() as root:
        cfg = validate(load_config(None, [*overrides, f"run.dir={root}", "run.name=bench",
                                          f"train.steps={warmup + steps}", "checkpoint.persist_every=0",
                                          "log.every=1", "log.progress=none", "log.wandb=disabled"]))
        run_dir, _ = prepare_run_dir(cfg)
        device = pick_device(cfg.run.device, 0)
        trainer = Trainer(cfg, DistContext(0, 1, 0, device), run_dir)
        stamps: list[float] = []
        trainer.hooks.append(lambda t, m: stamps.append(time.perf_counter()))
        trainer.save = lambda: None  # the final persist is not part of a step
        trainer.fit()
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]


def anchor_steps(overrides: list[str], steps: int, warmup: int) -> list[float]:
    """The loop a PyTorch user writes by hand, on the same model, optimizer and batch."""
    cfg = validate(load_config(None, overrides))
    device = pick_device(cfg.run.device, 0)
    model = materialize(build_on_meta(cfg.model), device, cfg.run.seed)
    if cfg.train.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(model, cfg.optim, device)
    schedule = build_schedule(optimizer, cfg.optim, warmup + steps + 1)
    batch = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.data.seq_len + 1), device=device)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.dtype == "bf16"
                else contextlib.nullcontext())
    times = []
    last = time.perf_counter()
    for _ in range(warmup + steps + 1):
        with autocast:
            logits = model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, foreach=True)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times[warmup + 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="train.compile=true for both")
    parser.add_argument("--quick", action="store_true", help="tiny shape, one short round (the test suite's run)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. model.n_layers=2")
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    overrides = [*PRESETS[args.preset], *args.overrides] + (["train.compile=true"] if args.compile else [])

    ours, anchor = [], []
    for r in range(args.rounds):
        first, second = (phalanx_steps, anchor_steps) if r % 2 == 0 else (anchor_steps, phalanx_steps)
        a = first(overrides, args.steps, args.warmup)
        b = second(overrides, args.steps, args.warmup)
        (ours if first is phalanx_steps else anchor).extend(a)
        (anchor if first is phalanx_steps else ours).extend(b)
        print(f"round {r}: phalanx {statistics.median(ours) * 1e3:.1f} ms/step, "
              f"anchor {statistics.median(anchor) * 1e3:.1f} ms/step", flush=True)

    cfg = validate(load_config(None, overrides))
    device = pick_device(cfg.run.device, 0)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    t_ours, t_anchor = statistics.median(ours), statistics.median(anchor)
    peak = peak_flops(device, cfg.train.dtype)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    mfu = (lambda t: fpt * tokens / t / peak if peak else None)
    result = {
        "bench": "trainer_overhead",
        "anchor": "plain PyTorch loop",
        "speedup": t_anchor / t_ours,
        "phalanx_step_s": t_ours,
        "anchor_step_s": t_anchor,
        "phalanx_mfu": mfu(t_ours),
        "anchor_mfu": mfu(t_anchor),
        "tokens_per_step": tokens,
        "preset": args.preset,
        "compile": args.compile,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "samples": len(ours),
        "date": time.strftime("%Y-%m-%d"),
    }
    assert math.isfinite(result["speedup"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
