"""Small persisted checkpoints written in this process (no trainer, no keeper), and the attacker's tools:
files rewritten with their manifest digests rewritten too, pickles that call what they name."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from phalanx.checkpoint.flat import FlatLayout
from phalanx.checkpoint.persistent import CheckpointStore, persist_plan

RANK_LOCAL = ("rng",)


def state_at(step: int) -> dict[str, Any]:
    """A trainer-like state: shared tensors, a non-tensor value, rank-local RNG streams."""
    gen = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(8, 4, generator=gen), "b": torch.randn(4, generator=gen)},
        "optim": {"state": {"w": {"step": torch.tensor(float(step)), "exp_avg": torch.randn(8, 4, generator=gen)}},
                  "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": ["w"]}]},
        "rng": {"python": random.Random(step).getstate(), "torch": torch.get_rng_state()},
        "step": step,
    }


def template() -> dict[str, Any]:
    state = state_at(0)
    state["model"] = {k: torch.zeros_like(v) for k, v in state["model"].items()}
    return state


def write_steps(root: Path, steps: tuple[int, ...] = (1, 2), key: Optional[bytes] = None) -> CheckpointStore:
    store = CheckpointStore(str(root), key=key)
    for step in steps:
        state = state_at(step)
        layout = FlatLayout.of(state)
        plan = persist_plan(state, layout, RANK_LOCAL, 0, lambda obj: [obj])
        block = torch.zeros(layout.nbytes, dtype=torch.uint8)
        layout.pack(block, state)
        store.write_rank(step, 0, memoryview(block.numpy()), plan)
        store.finalize(step, 1, timeout_s=30, keep_last=0, info={})
    return store


def load(store: CheckpointStore, step: int) -> dict[str, Any]:
    return store.load(step, template(), 0, 1, RANK_LOCAL)


def rewrite(step_dir: Path, name: str, data: bytes, fix_digest: bool = True) -> None:
    """Replace a file of a checkpoint; with `fix_digest`, also its size and digest in the manifest, as
    anyone with write access to the store can."""
    (step_dir / name).write_bytes(data)
    if fix_digest and name != "manifest.json":
        manifest = json.loads((step_dir / "manifest.json").read_text())
        manifest["files"][name] = {"bytes": len(data),
                                   "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()}
        (step_dir / "manifest.json").write_text(json.dumps(manifest))


def calling(module: str, name: str, arg: Any) -> bytes:
    """A protocol-4 pickle that resolves `module`.`name` (dotted names allowed) and calls it with `arg`."""
    def text(value: str) -> bytes:
        raw = value.encode()
        return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw

    return (pickle.PROTO + b"\x04" + text(module) + text(name) + pickle.STACK_GLOBAL + pickle.dumps(arg, 4)[2:-1]
            + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)


def patching_a_class() -> bytes:
    """A pickle that BUILDs onto DCP's Metadata class itself: setattr(Metadata, '__init__', torch.Size)."""
    def text(value: str) -> bytes:
        raw = value.encode()
        return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw

    return (pickle.PROTO + b"\x04" + text("torch.distributed.checkpoint.metadata") + text("Metadata")
            + pickle.STACK_GLOBAL + pickle.NONE + pickle.EMPTY_DICT + text("__init__") + text("torch") + text("Size")
            + pickle.STACK_GLOBAL + pickle.SETITEM + pickle.TUPLE2 + pickle.BUILD + pickle.STOP)


def equal_states(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal_states(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return a == b
