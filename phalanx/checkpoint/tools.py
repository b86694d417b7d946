"""`phalanx ckpt`: list, verify and export the checkpoints of a run directory.

`ls` shows every persisted step folder (verified by reading every file against its manifest) and,
when this node's keeper of the run answers, the snapshot steps it holds in memory. `verify` names each
problem file. `export` writes the model's consolidated weights to one safetensors file for inference
tools: DCP reads every shard (FSDP, expert or pipeline-stage pieces) into full-size tensors built from
the checkpoint's own metadata, in this process, without a process group.
"""

from __future__ import annotations

import glob
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch

from phalanx.checkpoint.persistent import MANIFEST, CheckpointStore
from phalanx.checkpoint.vetted import SafeLoadPlanner, VettedReader
from phalanx.errors import PhalanxError

MODEL_PREFIX = "model."
FORMATS = ("safetensors", "hf")  # one file of plain GPT names; a Hugging Face Llama folder (export_hf.py)


@dataclass
class CheckpointRow:
    """One line of `phalanx ckpt ls`."""

    step: int
    tier: str  # "storage" or "keeper (node N)"
    nbytes: Optional[int]
    files: str
    verified: str  # "yes", "NO: <first problem>", "incomplete (no manifest)", "in memory"


def human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _run_config(run_dir: str) -> dict[str, Any]:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}


def open_run(run_dir: str, key_file: Optional[str] = None, create_key: bool = False
             ) -> tuple[CheckpointStore, dict[str, Any]]:
    """The run's checkpoint store (config.yaml's checkpoint.storage, else RUN/checkpoints) and its config.
    Signatures are checked with the run's secret, or the one in `key_file` (another run's); a run folder
    with no secret (copied without it) checks none unless `create_key` makes it one."""
    from phalanx.checkpoint.link import run_secret
    from phalanx.checkpoint.signing import signing_key

    if not os.path.isdir(run_dir):
        raise PhalanxError(f"no run folder '{run_dir}': pass a run directory such as runs/tiny "
                           f"(the run.dir/run.name a training run wrote)")
    cfg = _run_config(run_dir)
    section = cfg.get("checkpoint") or {}
    storage = section.get("storage") or os.path.join(run_dir, "checkpoints")
    secret = run_secret(run_dir, key_file or section.get("key_file") or "", create=create_key)
    key = signing_key(secret) if secret is not None and section.get("sign", True) else None
    return CheckpointStore(storage, key=key, run_hint=run_dir), cfg


def _check_step(store: CheckpointStore, run_dir: str, step: int) -> None:
    steps = store.step_dirs()
    if step not in steps:
        have = ", ".join(map(str, steps)) or "none"
        raise PhalanxError(f"run '{run_dir}' has no checkpoint step-{step} in {store.url} (persisted steps: {have}); "
                           f"pick one from `phalanx ckpt ls {run_dir}`")


def storage_rows(store: CheckpointStore) -> list[CheckpointRow]:
    rows = []
    for step in store.step_dirs():
        manifest = store.manifest(step)
        if manifest is None:
            names = [p for p in store.fs.ls(store.path(step), detail=True) if p["type"] == "file"]
            rows.append(CheckpointRow(step, "storage", sum(p["size"] for p in names), str(len(names)),
                                      "incomplete (no manifest)"))
            continue
        problems = store.verify(step)
        files = manifest["files"]
        rows.append(CheckpointRow(step, "storage", sum(f["bytes"] for f in files.values()), str(len(files)),
                                  "yes" if not problems else f"NO: {problems[0]}"))
    return rows


def keeper_rows(run_dir: str, cfg: dict[str, Any], timeout: float = 2.0) -> Optional[list[CheckpointRow]]:
    """Snapshot steps held by this machine's live keepers of the run; None when no keeper answers."""
    from phalanx.checkpoint.keeper import node_dir
    from phalanx.checkpoint.link import default_keeper_dir, read_discovery, run_identity
    from phalanx.checkpoint.wire import KeeperClient, WireError

    if not os.path.exists(os.path.join(run_dir, ".keeper-secret")):
        return None  # never ran with snapshots: no keeper can hold anything (and no secret is created here)
    run_id, secret = run_identity(run_dir)
    keeper_dir = (cfg.get("checkpoint") or {}).get("keeper_dir") or default_keeper_dir()
    rows, answered = [], False
    for path in sorted(glob.glob(os.path.join(keeper_dir, run_id, "node-*.json"))):
        info = read_discovery(path)
        if info is None:
            continue
        try:
            client = KeeperClient(info["host"], info["port"], secret, timeout)
        except WireError:
            continue
        try:
            inventory, _ = client.call("inventory")
        except WireError:
            continue
        finally:
            client.close()
        answered = True
        node = inventory["node"]
        held: dict[int, list[int]] = {}
        for rank, entry in inventory["data"].items():
            for step, _slot in entry["steps"]:
                held.setdefault(step, []).append(int(rank))
        for step in sorted(held):
            ranks = sorted(held[step])
            # A slot file is exactly one rank's block (the register plan's layout size).
            sizes = [_slot_bytes(node_dir(keeper_dir, run_id, node), r, inventory["data"][str(r)]["steps"], step)
                     for r in ranks]
            nbytes = None if any(s is None for s in sizes) else sum(sizes)
            label = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {','.join(map(str, ranks))}"
            rows.append(CheckpointRow(step, f"keeper (node {node})", nbytes, label, "in memory"))
    return rows if answered else None


def _slot_bytes(folder: str, rank: int, steps: list[list[int]], step: int) -> Optional[int]:
    slot = next(s for st, s in steps if st == step)
    try:
        return os.path.getsize(os.path.join(folder, f"rank-{rank}-slot-{slot}.bin"))
    except OSError:
        return None


def list_checkpoints(run_dir: str) -> str:
    """The `phalanx ckpt ls` table."""
    store, cfg = open_run(run_dir)
    rows = storage_rows(store)
    memory = keeper_rows(run_dir, cfg)
    rows += memory or []
    lines = [f"checkpoints of {run_dir} (storage: {store.url})"]
    if rows:
        table = [("step", "tier", "size", "files", "verified")]
        table += [(str(r.step), r.tier, human_bytes(r.nbytes), r.files, r.verified) for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(4)]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in table]
    else:
        lines.append("no persisted checkpoints")
    if memory is None:
        lines.append("no live keeper (no snapshot steps in memory on this machine)")
    return "\n".join(lines)


def verify_checkpoints(run_dir: str, step: Optional[int] = None, key_file: Optional[str] = None,
                       trust: bool = False) -> tuple[list[str], bool]:
    """(report lines, every checked step verified) for `step`, or every persisted step. `trust` adopts
    `step`: everything but its signature verifies, then this run's key signs it."""
    if trust and (step is None or key_file):
        raise PhalanxError("--trust adopts one checkpoint into this run: give it --step N (and no --key; the "
                           "run's own key signs it)")
    store, _ = open_run(run_dir, key_file, create_key=trust)
    if step is not None:
        _check_step(store, run_dir, step)
    if trust:
        from phalanx.checkpoint.signing import key_id

        store.adopt(step)
        return [f"step-{step}: adopted: every file verified, now signed with this run's key "
                f"(key id {key_id(store.key)})"], True
    steps = [step] if step is not None else store.step_dirs()
    if not steps:
        raise PhalanxError(f"run '{run_dir}' has no persisted checkpoints in {store.url}; nothing to verify")
    lines, ok = [], True
    if store.key is None:
        lines.append("signatures not checked: checkpoint.sign=false, or no key for this run (its .keeper-secret is "
                     "absent and neither --key, checkpoint.key_file nor PHALANX_RUN_SECRET gives one)")
    for s in steps:
        problems = store.verify(s)
        if problems:
            ok = False
            lines.append(f"step-{s}: FAILED")
            lines += [f"  {p}" for p in problems]
        else:
            files = store.manifest(s)["files"]
            lines.append(f"step-{s}: verified ({len(files)} files, "
                         f"{human_bytes(sum(f['bytes'] for f in files.values()))}"
                         f"{', signed' if store.key is not None else ''})")
    return lines, ok


def consolidated_model(store: CheckpointStore, step: int) -> dict[str, torch.Tensor]:
    """The full model weights of one checkpoint, keyed as the unparallelised model names them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = store.read_metadata(step)
    state = {fqn: torch.empty(meta.size, dtype=meta.properties.dtype)
             for fqn, meta in metadata.state_dict_metadata.items()
             if fqn.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)}
    if not state:
        raise PhalanxError(f"checkpoint {store.path(step)} holds no model weights (no '{MODEL_PREFIX}*' tensors)")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=VettedReader(store.step_url(step), metadata), planner=SafeLoadPlanner(),
                 no_dist=True)
    return {fqn[len(MODEL_PREFIX):]: tensor for fqn, tensor in state.items()}


def export_checkpoint(run_dir: str, step: Optional[int], fmt: str = "safetensors", out: Optional[str] = None,
                      force: bool = False) -> tuple[str, int, int]:
    """Write step `step`'s (default: the newest verified one) model weights; returns (file, tensors, bytes)."""
    if fmt not in FORMATS:
        raise PhalanxError(f"export format '{fmt}' is not supported; use --format {' or '.join(FORMATS)}")
    store, _ = open_run(run_dir)
    if step is None:
        step = store.newest_valid(lambda s, problem: None)
        if step is None:
            raise PhalanxError(f"run '{run_dir}' has no verified checkpoint in {store.url} to export; "
                               f"see `phalanx ckpt verify {run_dir}`")
    else:
        _check_step(store, run_dir, step)
    out = out or os.path.join(run_dir, "export", f"step-{step}" + ("-hf" if fmt == "hf" else ".safetensors"))
    if os.path.exists(out) and not force:
        raise PhalanxError(f"{out} exists; pass --force to replace it, or --out another "
                           f"{'folder' if fmt == 'hf' else 'file'}")
    problems = store.verify(step)
    if problems:
        raise PhalanxError(f"step-{step} does not verify ({problems[0]}); export a step that does "
                           f"(`phalanx ckpt verify {run_dir}`)")
    manifest = store.manifest(step) or {}
    if ".metadata" not in manifest.get("files", {}):
        raise PhalanxError(f"step-{step} has no DCP .metadata listed in its {MANIFEST}: not a phalanx checkpoint")
    weights = {k: v.contiguous() for k, v in consolidated_model(store, step).items()}
    if fmt == "hf":
        from phalanx.checkpoint.export_hf import write_hf

        return write_hf(weights, _run_config(run_dir), out, step, force)
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    save_file(weights, tmp, metadata={"format": "pt", "phalanx_step": str(step), "source": store.path(step)})
    os.replace(tmp, out)  # never a half-written file under the final name
    return out, len(weights), sum(v.numel() * v.element_size() for v in weights.values())
