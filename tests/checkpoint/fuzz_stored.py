"""Fuzz every stored file kind of a persisted checkpoint; run as a process so its peak memory is its own:

    python -m tests.checkpoint.fuzz_stored --examples 2000

Each case rewrites one file of step-2 (a byte flipped, cut short, extended, or a length field set to a
large number; the manifest's digest rewritten too or not) and asks what a resume asks: which step
verifies, then loads it. Every case must end in a refusal (CheckpointRefused / a verify problem) that
falls back to step 1, or a load of step 2 — never another exception. The last line is JSON: the
cases, their outcomes, unexpected failures and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from phalanx.checkpoint.untrusted import CheckpointRefused
from tests.checkpoint.stored import load, rewrite, write_steps

KINDS = (".metadata", "__0_0.distcp", "rank-0.safetensors", "manifest.json")
OPS = ("flip", "truncate", "extend", "length", "many_files")


def mutate(data: bytes, op: str, position: int, value: int, extra: bytes) -> bytes:
    if not data:
        return extra
    at = position % len(data)
    if op == "flip":
        out = bytearray(data)
        out[at] ^= (value % 255) + 1
        return bytes(out)
    if op == "truncate":
        return data[:at]
    if op == "extend":
        return data + extra
    width = 8 if value % 2 else 4  # a little-endian length field of either width, set to a large number
    number = (value >> 1) % (1 << (8 * width))
    return data[:at] + number.to_bytes(width, "little") + data[at + width:]


def mutate_manifest(data: bytes, op: str, value: int) -> bytes:
    if op == "many_files":  # a manifest listing a million files
        head, tail = data.decode().split('"files": {', 1)
        many = "".join(f'"__{i}_0.distcp":{{"bytes":1,"blake2b":"{"0" * 32}"}},' for i in range(10 ** 6))
        return (head + '"files": {' + many + tail).encode()
    manifest = json.loads(data)
    if op == "length":
        name = sorted(manifest["files"])[value % len(manifest["files"])]
        manifest["files"][name]["bytes"] = value
    else:
        return b""
    return json.dumps(manifest).encode()


def run(examples: int, seed_value: int) -> dict:
    """`seed_value` 0: the suite's fixed, derandomized cases; any other: a different random exploration."""
    base = Path(tempfile.mkdtemp(prefix="phalanx-fuzz-"))
    pristine = base / "pristine"
    write_steps(pristine)
    outcomes: Counter = Counter()
    failures: list[str] = []

    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, derandomize=seed_value == 0, database=None,
              suppress_health_check=list(HealthCheck))
    @given(kind=st.sampled_from(KINDS), op=st.sampled_from(OPS), fix=st.booleans(),
           position=st.integers(0, 1 << 31), value=st.integers(0, (1 << 65) - 1),
           extra=st.binary(min_size=1, max_size=64))
    def case(kind: str, op: str, fix: bool, position: int, value: int, extra: bytes) -> None:
        root = base / "case"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(pristine, root)
        step_dir = root / "step-2"
        original = (step_dir / kind).read_bytes()
        if kind == "manifest.json" and op in ("length", "many_files"):
            data = mutate_manifest(original, op, value)
        else:
            data = mutate(original, "length" if op == "many_files" else op, position, value, extra)
        rewrite(step_dir, kind, data, fix_digest=fix)
        from phalanx.checkpoint.persistent import CheckpointStore

        store = CheckpointStore(str(root))
        try:
            skipped: list[int] = []
            step = store.newest_valid(lambda s, problem: skipped.append(s))
            assert step in (1, 2), f"no verified fallback: {step}"
            try:
                load(store, step)
                outcomes["loaded step 2" if step == 2 else "refused at verify, loaded step 1"] += 1
            except CheckpointRefused:
                assert step == 2
                load(store, store.newest_valid(lambda s, problem: None, below=2))
                outcomes["refused at load, loaded step 1"] += 1
        except Exception:
            failures.append(f"{kind} {op} fix={fix} position={position} value={value}: "
                            + traceback.format_exc().strip().splitlines()[-1])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case()
    shutil.rmtree(base, ignore_errors=True)
    return {"cases": sum(outcomes.values()) + len(failures), "outcomes": dict(outcomes), "failures": failures[:20],
            "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="0: the fixed cases the suite runs")
    args = parser.parse_args()
    print(json.dumps(run(args.examples, args.seed)))


if __name__ == "__main__":
    main()
