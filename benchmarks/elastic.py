"""Resharding load time: phalanx reading another layout's keeper blocks (`checkpoint/reshard.py`) against DCP's
own load of the same state, one process, one run.

    .venv/bin/python benchmarks/elastic.py [--d-model 512] [--layers 8] [--old-ranks 4] [--repeats 5]
    .venv/bin/python benchmarks/elastic.py --quick     # the tests' tiny GPT: checks it runs

The state is a GPT's (phalanx's model class) with AdamW's moments, as a trainer saves it. Layout A is
`--old-ranks` FSDP-style ranks: every tensor's rows split over them. Each old rank's share is packed into a
keeper block exactly as a snapshot packs it (`flat.FlatLayout`, global names and offsets), and the same state is
written by `torch.distributed.checkpoint.save` to local disk (read once before timing, so both read memory).
Layout B is one process holding the whole state. Timed, best of `--repeats`:

  phalanx   `reshard.reshard(template, layouts, fetch)`: DCP's load planner over the blocks (metadata from
            the old ranks' layouts, each block fetched once);
  anchor    `torch.distributed.checkpoint.load(template, checkpoint_id=DIR)`.

Both fill the same template and are checked equal. speedup = anchor / phalanx; the issue's target is a
reshard no slower than 1.2x DCP's load (speedup >= 0.83). The other half of the elastic benchmark — node loss to
the first step on the smaller layout against Ray Train and torchft — is not here yet (see RESULTS.md).
Last line: JSON with `speedup`, both times, bytes and the layout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def build_state(d_model: int, layers: int) -> dict[str, Any]:
    """A trainer-shaped state of a GPT: weights, AdamW moments and step, schedule and data position."""
    import torch

    from phalanx.config import load_config
    from phalanx.models import build_on_meta, materialize

    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                      [f"model.d_model={d_model}", f"model.n_layers={layers}", "model.n_heads=8", "model.n_kv_heads=4"])
    model = materialize(build_on_meta(cfg.model), torch.device("cpu"), seed=0)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    optim = {name: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(w), "exp_avg_sq": torch.rand_like(w)}
             for name, w in weights.items()}
    return {"model": weights, "optim": {"state": optim}, "step": 10, "data": {"consumed": 160, "batch_size": 16}}


def old_blocks(state: dict[str, Any], ranks: int) -> tuple[dict[int, Any], dict[int, Any]]:
    """Each old rank's block and layout: every tensor's rows split over `ranks` (the last row-chunk may be short,
    a tensor with fewer rows than ranks goes whole to rank 0), packed as a snapshot packs them."""
    import torch
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    from phalanx.checkpoint.flat import ALIGN, FlatLayout, LeafMeta, dtype_name

    flat, mapping = flatten_state_dict(state)
    shares: dict[int, list[tuple[str, torch.Tensor, int]]] = {r: [] for r in range(ranks)}
    for fqn, value in flat.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.dim() == 0 or value.shape[0] < ranks:
            shares[0].append((fqn, value, 0))
            continue
        rows = -(-value.shape[0] // ranks)
        for r in range(ranks):
            if r * rows < value.shape[0]:
                shares[r].append((fqn, value[r * rows: (r + 1) * rows], r * rows))
    layouts, blocks = {}, {}
    values = {fqn: v for fqn, v in flat.items() if not isinstance(v, torch.Tensor)}
    for r, share in shares.items():
        leaves, offset = [], 0
        for fqn, chunk, row in share:
            nbytes = chunk.numel() * chunk.element_size()
            full = flat[fqn]
            leaves.append(LeafMeta(fqn, dtype_name(chunk.dtype), list(chunk.shape), offset, nbytes, list(full.shape),
                                   [row] + [0] * (full.dim() - 1) if full.dim() else []))
            offset += -(-nbytes // ALIGN) * ALIGN
        layout = FlatLayout(leaves, 64 * 1024)
        block = torch.zeros(layout.nbytes, dtype=torch.uint8)
        skeleton = {**values, **{fqn: chunk for fqn, chunk, _ in share}}
        from torch.distributed.checkpoint._nested_dict import unflatten_state_dict

        layout.pack(block, unflatten_state_dict(skeleton, {k: mapping[k] for k in skeleton}))
        layouts[r], blocks[r] = layout, block
    return layouts, blocks


def template_of(state: dict[str, Any]) -> dict[str, Any]:
    import torch

    def empty(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.empty_like(value)
        if isinstance(value, dict):
            return {k: empty(v) for k, v in value.items()}
        return value

    return empty(state)


def assert_equal(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
    import torch

    for key, value in want.items():
        if isinstance(value, dict):
            assert_equal(got[key], value, f"{where}.{key}")
        elif isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), f"{where}.{key} differs"
        else:
            assert got[key] == value, f"{where}.{key}: {got[key]!r} != {value!r}"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as dcp

    from phalanx.checkpoint.reshard import reshard

    torch.set_num_threads(1)
    state = build_state(args.d_model, args.layers)
    layouts, blocks = old_blocks(state, args.old_ranks)
    nbytes = sum(layout.tensor_bytes for layout in layouts.values())
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        dcp.save(state, checkpoint_id=folder, no_dist=True)
        dcp.load(template_of(state), checkpoint_id=folder, no_dist=True)  # its files now in the page cache
        phalanx_s, anchor_s = [], []
        for _ in range(args.repeats):
            template = template_of(state)
            start = time.perf_counter()
            loaded, read = reshard(template, layouts, blocks.__getitem__, ())
            phalanx_s.append(time.perf_counter() - start)
            assert_equal(loaded, state, "reshard")
            template = template_of(state)
            start = time.perf_counter()
            dcp.load(template, checkpoint_id=folder, no_dist=True)
            anchor_s.append(time.perf_counter() - start)
            assert_equal(template, state, "dcp")
    assert read == sorted(layouts), read
    return {"phalanx_s": min(phalanx_s), "anchor_s": min(anchor_s), "bytes": nbytes}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--old-ranks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a tiny GPT, 2 repeats: checks the script runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.layers, args.repeats = 64, 2, 2
    result = measure(args)
    speedup = result["anchor_s"] / result["phalanx_s"]
    print(f"state: GPT d_model={args.d_model} x {args.layers} layers + AdamW, {result['bytes'] / 2**20:.1f} MiB, "
          f"layout A = {args.old_ranks} row-sharded ranks -> layout B = 1 process ({platform.machine()}, "
          f"{os.cpu_count()} cores, torch {__import__('torch').__version__})")
    print(f"phalanx reshard from keeper blocks: {result['phalanx_s'] * 1e3:8.1f} ms")
    print(f"DCP load of the same state (disk):  {result['anchor_s'] * 1e3:8.1f} ms   speedup {speedup:.2f}x "
          f"(target: reshard <= 1.2x DCP, speedup >= 0.83)")
    print(json.dumps({"speedup": speedup, "phalanx_ms": result["phalanx_s"] * 1e3,
                      "anchor_ms": result["anchor_s"] * 1e3, "bytes": result["bytes"], "old_ranks": args.old_ranks,
                      "d_model": args.d_model, "layers": args.layers}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
