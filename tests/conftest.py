import os

# Tests run on the CPU, on loopback only.
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("WANDB_SILENT", "true")


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _no_keeper_outlives_the_tests(tmp_path_factory):
    """Checkpoint keepers are detached on purpose (they outlive trainers); the ones this session
    started, recognised by their run folder under pytest's base temp, are stopped at its end."""
    base = str(tmp_path_factory.getbasetemp())
    yield
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "phalanx.checkpoint.keeper" in cmdline and any(arg.startswith(base) for arg in cmdline):
            proc.kill()
