"""Every benchmark script runs: `benchmarks/<name>.py --quick` ends with one JSON line that carries a positive,
finite `speedup` (its headline ratio against its anchor). Quick figures are not results; this only keeps the
scripts from rotting as phalanx's API moves."""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, loopback_env

pytestmark = pytest.mark.slow

BENCHMARKS = sorted((REPO / "benchmarks").glob("*.py"))  # (benchmarks/parts/: pieces of them)
SKIPPED = 77  # a benchmark whose anchor is not installed says why on stderr and exits with this (recovery.py)
TIMEOUT_S = 240
# recovery.py and elastic.py with the bench extra start a Ray cluster per side and wait out a failure on each;
# goodput.py starts a 3-node cluster and recovers from random faults.
TIMEOUTS_S = {"recovery": 420, "elastic": 600, "goodput": 420}
# Keys of the last line that RESULTS.md quotes, beside `speedup`; a new benchmark needs only `speedup`.
KEYS = {
    "checkpoint": {"stall_ms", "step_overhead_pct", "encode_gbps", "snapshot_matches_state"},
    "data_prepare": {"phalanx_tokens_per_s", "datasets_tokens_per_s", "tokens"},
    "elastic": {"phalanx_ms", "anchor_ms", "bytes"},
    "erasure": {"anchor", "encode_gbps", "decode_gbps", "configs"},
    "goodput": {"max_diff_points", "rates", "terms"},
    "moe": {"one_process", "ep2"},
    "pipeline": {"bubble", "bubble_max_diff_points", "phalanx_ms", "anchor_ms"},
    "plan": {"max_abs_error", "within_25pct", "layouts", "recommended_vs_best"},
    "plan_anchors": {"anchors"},
    "recovery": {"phalanx_downtime_s", "raytrain_downtime_s", "phalanx", "raytrain"},
    "trainer_overhead": {"phalanx_step_s", "anchor_step_s"},
    "ulysses": {"layer", "train_tokens_per_s_per_device"},
}


def test_every_benchmark_is_found():
    assert len(BENCHMARKS) >= 10, [p.name for p in BENCHMARKS]


# The ones that start a Ray cluster and time a failure run alone, after the tests that run side by side.
USES_RAY = {"recovery", "elastic", "goodput"}


@pytest.fixture(scope="module")
def runner():
    """tests/bench_runner.py: forks each script from one process that imported torch and DeepSpeed once."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.bench_runner"], cwd=REPO, env=loopback_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    yield proc
    proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def quick_run(script: Path, runner: subprocess.Popen, folder: Path) -> subprocess.CompletedProcess:
    """`script --quick` forked by the runner (a Ray one as a process of its own: Ray starts its own workers)."""
    timeout = TIMEOUTS_S.get(script.stem, TIMEOUT_S)
    if script.stem in USES_RAY:
        return subprocess.run([sys.executable, str(script), "--quick"], cwd=REPO, env=loopback_env(),
                              capture_output=True, text=True, timeout=timeout)
    out, err = folder / "stdout", folder / "stderr"
    runner.stdin.write(json.dumps({"script": str(script), "out": str(out), "err": str(err)}) + "\n")
    runner.stdin.flush()
    ready, _, _ = select.select([runner.stdout], [], [], timeout)
    if not ready:
        os.killpg(runner.pid, signal.SIGKILL)
        pytest.fail(f"{script.name} --quick did not end within {timeout} s:\n{err.read_text()[-3000:]}")
    code = json.loads(runner.stdout.readline())["code"]
    return subprocess.CompletedProcess(script, code, out.read_text(), err.read_text())


@pytest.mark.parametrize("script", [pytest.param(p, marks=pytest.mark.serial) if p.stem in USES_RAY else p
                                    for p in BENCHMARKS], ids=lambda p: p.stem)
def test_benchmark_quick_run_ends_with_its_ratio(script, runner, tmp_path):
    done = quick_run(script, runner, tmp_path)
    tail = (done.stdout + done.stderr)[-4000:]
    if done.returncode == SKIPPED:
        pytest.skip((done.stderr.strip().splitlines() or [f"{script.name}: exit status {SKIPPED}"])[-1])
    assert done.returncode == 0, f"{script.name} --quick exited with {done.returncode}:\n{tail}"
    lines = done.stdout.strip().splitlines()
    assert lines, f"{script.name} --quick printed nothing:\n{tail}"
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError:
        pytest.fail(f"{script.name} --quick: the last stdout line is not JSON: {lines[-1][:500]!r}")
    assert isinstance(result, dict), f"{script.name}: the last line is not a JSON object: {lines[-1][:500]!r}"
    missing = ({"speedup"} | KEYS.get(script.stem, set())) - set(result)
    assert not missing, f"{script.name}: no {sorted(missing)} in the last line's keys {sorted(result)}"
    speedup = result["speedup"]
    assert isinstance(speedup, (int, float)) and math.isfinite(speedup) and speedup > 0, \
        f"{script.name}: speedup {speedup!r} is not a positive finite number"
    if script.stem == "checkpoint":  # not a timing: the snapshot read back from the keeper is the live state
        assert result["snapshot_matches_state"] is True
