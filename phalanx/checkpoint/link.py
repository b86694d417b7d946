"""Finding, starting and reaching this node's keeper; the run's secret and identity.

A run is identified by a hash of its directory, so two runs never share a keeper. The secret is 32
random bytes kept in `runs/NAME/.keeper-secret` (mode 0600) — or given by PHALANX_RUN_SECRET or a
file `checkpoint.key_file` names, for runs that move between machines — read by rank 0 and handed to
every rank over the process group, and to a keeper on its stdin. It authenticates keeper connections
and, through a derived key, signs persisted checkpoints (`signing.py`). A node's keeper is found through
`{keeper_dir}/{run_id}/node-N.json`; the local ranks of a node agree on one keeper under a file lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from typing import Optional

from phalanx.checkpoint.keeper import discovery_file
from phalanx.checkpoint.wire import KeeperClient, WireError
from phalanx.errors import PhalanxError


SECRET_ENV = "PHALANX_RUN_SECRET"
SECRET_FILE = ".keeper-secret"


def _parse_secret(text: str, source: str) -> bytes:
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise PhalanxError(f"{source} must hold the run's secret as at least 32 hex digits (make one with "
                           f"`python -c 'import os; print(os.urandom(32).hex())'`)")
    return secret


def run_secret(run_dir: str, key_file: str = "", create: bool = True) -> Optional[bytes]:
    """The run's secret: PHALANX_RUN_SECRET, else the file `key_file` names, else the run folder's
    .keeper-secret (created once, readable by its owner only, when `create`; else None if absent)."""
    if os.environ.get(SECRET_ENV):
        return _parse_secret(os.environ[SECRET_ENV], f"the environment variable {SECRET_ENV}")
    if key_file:
        try:
            with open(key_file) as f:
                return _parse_secret(f.read(4096), f"checkpoint.key_file={key_file}")
        except OSError as err:
            raise PhalanxError(f"checkpoint.key_file={key_file} cannot be read ({err.strerror}): point it at the "
                               f"file holding the run's secret, or leave it empty to use the run folder's") from None
    path = os.path.join(run_dir, SECRET_FILE)
    if not os.path.exists(path):
        if not create:
            return None
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex())
        os.replace(path + ".tmp", path)
    with open(path) as f:
        return _parse_secret(f.read(4096), path)


def run_identity(run_dir: str, key_file: str = "") -> tuple[str, bytes]:
    """(run id, secret) of a run directory."""
    run_id = hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:16]
    return run_id, run_secret(run_dir, key_file)


def default_keeper_dir() -> str:
    """Shared memory where the machine has it (tmpfs: the keeper's slots are RAM), else the temp folder."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return os.path.join(base, f"phalanx-{os.getuid()}")


def keeper_host(requested: str) -> str:
    """The address keepers bind: loopback for a local run, else this node's address on the route to
    MASTER_ADDR (found without sending a packet), so keeper traffic stays on the cluster's interface."""
    if requested != "auto":
        return requested
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        if ipaddress.ip_address(socket.gethostbyname(master)).is_loopback:
            return "127.0.0.1"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((master, 9))
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


DISCOVERY_MAX_BYTES = 4096


def read_discovery(path: str) -> Optional[dict]:
    """A keeper's discovery file if it is one: a JSON object of at most 4 KiB with host (a str of at most
    255 characters), port (1..65535) and pid (a positive C int); None for anything else, as for no file."""
    try:  # non-blocking and regular files only: a FIFO put in its place must not hang the caller
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            data = f.read(DISCOVERY_MAX_BYTES + 1) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
        info = json.loads(data) if len(data) <= DISCOVERY_MAX_BYTES else None
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    if not isinstance(info, dict) or not isinstance(info.get("host"), str) or not 0 < len(info["host"]) <= 255:
        return None
    port, pid = info.get("port"), info.get("pid")
    if type(port) is not int or not 0 < port < 65536 or type(pid) is not int or not 0 < pid < 1 << 31:
        return None
    return info


def _try_connect(path: str, secret: bytes, timeout: float) -> Optional[KeeperClient]:
    info = read_discovery(path)
    if info is None or not _alive(info["pid"]):
        return None
    try:
        return KeeperClient(info["host"], info["port"], secret, timeout)
    except WireError:
        return None


def find_keeper(run_id: str, secret: bytes, node: int, keeper_dir: str, timeout: float) -> Optional[KeeperClient]:
    """A connection to the node's keeper if one is running (never starts one)."""
    return _try_connect(discovery_file(keeper_dir, run_id, node), secret, timeout)


def connect_keeper(run_dir: str, run_id: str, secret: bytes, node: int, host: str, keeper_dir: str,
                   linger_s: float, timeout: float) -> KeeperClient:
    """A connection to the node's keeper, starting one (detached) if none answers."""
    os.makedirs(os.path.join(keeper_dir, run_id), mode=0o700, exist_ok=True)  # the keeper checks its owner
    path = discovery_file(keeper_dir, run_id, node)
    client = _try_connect(path, secret, timeout)
    if client is not None:
        return client
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's local ranks start one keeper, not several
        client = _try_connect(path, secret, timeout)
        if client is not None:
            return client
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        log = os.path.join(run_dir, "keepers", f"node-{node}.log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        starter = subprocess.Popen(
            [sys.executable, "-m", "phalanx.checkpoint.keeper", "--daemon", "--run-id", run_id, "--node", str(node),
             "--host", host, "--dir", keeper_dir, "--linger", str(linger_s), "--log", log,
             "--run-dir", os.path.abspath(run_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
        starter.communicate(secret.hex().encode() + b"\n", timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            client = _try_connect(path, secret, timeout)
            if client is not None:
                return client
            time.sleep(0.05)
    raise PhalanxError(f"the checkpoint keeper for node {node} did not start within {timeout:.0f}s; "
                       f"see {log}")
