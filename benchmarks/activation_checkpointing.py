"""Activation checkpointing: activation memory saved and step time paid by `train.activation_checkpointing`
(none | selective | full), against torch's own `checkpoint_wrapper` on every block (torchtitan's full AC).

    .venv/bin/python benchmarks/activation_checkpointing.py [--d-model 512] [--layers 8] [--seq 512] [--batch 4]
    .venv/bin/python benchmarks/activation_checkpointing.py --quick     # a tiny GPT: checks it runs

One process, phalanx's GPT in fp32, one micro-batch. For each mode:

  activations  the bytes autograd holds for backward when the forward ends: every distinct tensor storage saved
               for backward (`torch.autograd.graph.saved_tensors_hooks`), parameters left out. Under
               checkpointing only each recomputed block's inputs are kept; the recompute in backward holds one
               block's activations at a time on top (not counted here: it is the same for every mode but none).
  step         forward + backward, best of --repeats.

The anchor is the same model with `torch.distributed.algorithms._checkpoint.checkpoint_wrapper` (non-reentrant)
applied to every block by `apply_activation_checkpointing`, as torchtitan does for full AC. Its gradients and
phalanx's (every mode) are checked equal to those without checkpointing. speedup = anchor step / phalanx full
step (phalanx puts the checkpoint inside the block's own call: no wrapper module, parameter names unchanged).
Last line: JSON with `speedup`, every mode's activation bytes and step seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODES = ("none", "selective", "full")


def build(args: argparse.Namespace) -> Any:
    import torch

    from phalanx.config import load_config
    from phalanx.models import build_on_meta, materialize

    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                      [f"model.d_model={args.d_model}", f"model.n_layers={args.layers}",
                       f"model.max_seq_len={args.seq}", "model.n_heads=8", "model.n_kv_heads=4"])
    return materialize(build_on_meta(cfg.model), torch.device("cpu"), seed=0), cfg.model.vocab_size


def activation_bytes(model: Any, tokens: Any) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward after the forward."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(tokens[:, :-1]).float().logsumexp(-1).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


def step(model: Any, tokens: Any) -> tuple[float, dict[str, Any]]:
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    seconds = time.perf_counter() - start
    return seconds, {name: p.grad.clone() for name, p in model.named_parameters()}


def anchor_model(model: Any) -> Any:
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl,
                                                                             apply_activation_checkpointing,
                                                                             checkpoint_wrapper)

    from phalanx.models.gpt import Block, set_activation_checkpointing

    wrapped = copy.deepcopy(model)
    set_activation_checkpointing(wrapped, "none")
    wrapper = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    apply_activation_checkpointing(wrapped, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, Block))
    return wrapped


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from phalanx.models.gpt import set_activation_checkpointing

    torch.set_num_threads(args.threads)
    model, vocab = build(args)
    tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    anchor = anchor_model(model)
    out: dict[str, Any] = {}
    reference = None
    for name in (*MODES, "anchor"):
        if name != "anchor":
            set_activation_checkpointing(model, name)
        target = anchor if name == "anchor" else model
        step(target, tokens)  # warm-up
        times, grads = [], None
        for _ in range(args.repeats):
            seconds, grads = step(target, tokens)
            times.append(seconds)
        clean = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in grads.items()}
        if reference is None:
            reference = clean
        for key, grad in reference.items():
            torch.testing.assert_close(clean[key], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name} {key}: {m}")
        out[name] = {"step_s": min(times), "activation_bytes": activation_bytes(target, tokens)}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)))
    parser.add_argument("--quick", action="store_true", help="a tiny GPT (4 blocks), 1 repeat: checks it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.layers, args.seq, args.batch, args.repeats, args.threads = 64, 4, 32, 2, 1, 1
    result = measure(args)
    none = result["none"]
    print(f"GPT d_model={args.d_model} x {args.layers} blocks, batch {args.batch} x seq {args.seq}, fp32 "
          f"({platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
          f"torch {__import__('torch').__version__}); step = forward + backward, best of {args.repeats}")
    print(f"{'mode':<30} {'activations MiB':>15} {'saved':>7} {'step ms':>9} {'time paid':>9}")
    for name, row in result.items():
        label = "anchor: torch checkpoint_wrapper" if name == "anchor" else f"phalanx {name}"
        saved = 1 - row["activation_bytes"] / none["activation_bytes"]
        paid = row["step_s"] / none["step_s"] - 1
        print(f"{label:<30} {row['activation_bytes'] / 2**20:>15.2f} {saved:>7.1%} {row['step_s'] * 1e3:>9.1f} "
              f"{paid:>+9.1%}")
    speedup = result["anchor"]["step_s"] / result["full"]["step_s"]
    print(f"speedup (anchor step / phalanx full step) {speedup:.3f}; every mode's gradients equal none's")
    print(json.dumps({"speedup": speedup, "modes": result, "d_model": args.d_model, "layers": args.layers,
                      "seq": args.seq, "batch": args.batch}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
