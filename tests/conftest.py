import os

# Tests run on the CPU, on loopback only.
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("WANDB_SILENT", "true")


import pytest  # noqa: E402
import torch  # noqa: E402

# One torch thread in this process, as in every rank the tests start: on a 2-core machine its in-process runs
# share the cores with keepers and ranks, and two OpenMP threads with one core taken wait on each other at
# every operation (a 6-step run of the tests' model took 4 s instead of 1).
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _no_keeper_outlives_the_tests(tmp_path_factory):
    """Checkpoint keepers are detached on purpose (they outlive trainers); the ones this session
    started for runs in temporary folders are stopped at its end."""
    import glob
    import shutil
    import tempfile
    import time

    import psutil

    # Every temporary folder of this session (and of the processes it starts) lies under its base
    # folder, so ending it stops only its own keepers, never those of another pytest session.
    roots = str(tmp_path_factory.getbasetemp())
    scratch = str(tmp_path_factory.mktemp("tmp"))
    # Ray's socket paths (at most 107 bytes) live in its temp folder: a short one of its own, not the scratch
    # folder of a pytest-xdist worker (/tmp/pytest-of-USER/pytest-N/popen-gwK/tmp0/ray/session_.../sockets/...).
    ray_tmp = None if "RAY_TMPDIR" in os.environ else tempfile.mkdtemp(prefix="ray-")
    if ray_tmp:
        os.environ["RAY_TMPDIR"] = ray_tmp
    os.environ["TMPDIR"] = tempfile.tempdir = scratch
    started = time.time()
    yield
    if ray_tmp:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    memory = set()
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        cmdline = proc.info["cmdline"] or []
        if ("phalanx.checkpoint.keeper" in cmdline and proc.info["create_time"] >= started - 1
                and any(arg.startswith(roots) for arg in cmdline)):
            proc.kill()
            memory.add(os.path.join(cmdline[cmdline.index("--dir") + 1], cmdline[cmdline.index("--run-id") + 1]))
    # A killed keeper leaves its run's slots in shared memory (RAM): gone with it, as when it lingers out. So
    # do the slots of this session's runs whose keepers a test killed (every keeper of the run is gone).
    from phalanx.checkpoint.link import default_keeper_dir, read_discovery

    for run in glob.glob(os.path.join(default_keeper_dir(), "*")):
        found = [read_discovery(path) for path in glob.glob(os.path.join(run, "node-*.json"))]
        pids = [info["pid"] for info in found if info]
        if os.path.getmtime(run) >= started - 1 and pids and not any(map(psutil.pid_exists, pids)):
            memory.add(run)
    for path in memory:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """`reference_run(config, world, *overrides)`: the run folder of a failure-free run of `config` with the
    tests' tiny model (`run_overrides`) on `world` pooled local ranks, trained once and shared by every test that
    asks for the same run. Treat it as read-only.

    Once per session, or once per `make test` when PHALANX_TEST_REFERENCES names a folder: its pytest sessions
    (the parallel one, then the serial one) find each other's runs there, by a digest of the request. A run stays
    in the pytest folder of the session that trained it (whose end stops its keepers; its files stay)."""
    import hashlib
    from pathlib import Path

    from tests.helpers import run_overrides, train_local

    cache: dict = {}
    shared = os.environ.get("PHALANX_TEST_REFERENCES")

    def run(config, world: int, *overrides: str):
        key = (str(config), world, overrides)
        if key in cache:
            return cache[key]
        index = Path(shared) / hashlib.sha256(repr(key).encode()).hexdigest()[:20] if shared else None
        found = Path(index.read_text()) if index is not None and index.exists() else None
        if found is not None and (found / "checkpoints").is_dir():
            cache[key] = found
            return cache[key]
        root = tmp_path_factory.mktemp("reference")
        train_local(config, run_overrides(root, *overrides), world)
        cache[key] = root / "t"
        if index is not None:  # written whole, then renamed: another session never reads half a path
            part = index.with_name(f"{index.name}.{os.getpid()}")
            part.write_text(str(cache[key]))
            os.replace(part, index)
        return cache[key]

    return run
