"""The run directory: `{run.dir}/{run.name}/` with the resolved config, metrics, events, checkpoints.

Relaunching the same command resumes in the same folder. `run.resume=false` starts fresh in a
new sibling folder (`NAME-2`, `NAME-3`, ...) so nothing a previous run saved is touched.
"""

from __future__ import annotations

import os
import time

from omegaconf import OmegaConf

from phalanx.config import PhalanxConfig, to_yaml
from phalanx.errors import ConfigError, PhalanxError


def _has_run(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, name)) for name in ("config.yaml", "checkpoints", "metrics.jsonl")
    )


def _fresh_path(base: str, suffix: str = "") -> str:
    """`base-N{suffix}` for the smallest N >= 2 that does not exist yet."""
    n = 2
    while os.path.exists(f"{base}-{n}{suffix}"):
        n += 1
    return f"{base}-{n}{suffix}"


def _check_same_model(path: str, cfg: PhalanxConfig) -> list[str]:
    """Keys whose value differs from the run's saved config; a different model is refused."""
    saved = OmegaConf.load(os.path.join(path, "config.yaml"))
    new = OmegaConf.create(to_yaml(cfg))
    changed = []
    for section in new:
        for key in new[section]:
            old_value = OmegaConf.select(saved, f"{section}.{key}", default="<absent>")
            if old_value != new[section][key]:
                changed.append(f"{section}.{key}: {old_value} -> {new[section][key]}")
                if section == "model" and key != "init_from":  # where fresh weights came from: not the model
                    raise ConfigError(
                        f"{path} was trained with model.{key}={old_value} but the config says {new[section][key]}; "
                        f"its checkpoints cannot load into this model: use another run.name, or run.resume=false "
                        f"to start fresh beside it"
                    )
    return changed


_LOCKS: dict[str, object] = {}  # open lock files, held for the life of the process


def _lock(path: str) -> None:
    """Hold `{path}/.lock` (a POSIX lock: released when this process dies, even by SIGKILL).

    Two launches writing one run folder would interleave checkpoints and metrics; the second is
    refused instead. The same process may lock again (tests build several trainers in one folder).
    """
    import fcntl
    import socket

    if os.environ.get("PHALANX_RUN_LOCK_HELD_BY"):  # a Ray controller holds it for its workers
        return
    lock_path = os.path.join(path, ".lock")
    handle = open(lock_path, "a+")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise PhalanxError(
            f"run directory '{path}' is in use by {holder}; stop that run first, or use another run.name"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"phalanx pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _LOCKS[os.path.abspath(path)] = handle


def prepare_run_dir(cfg: PhalanxConfig) -> tuple[str, list[str]]:
    """Create (or reuse) and lock the run directory, write `config.yaml`; returns (path, messages). Rank 0 only."""
    base = cfg.run_dir
    messages: list[str] = []
    path = base
    if _has_run(base) and not cfg.run.resume:
        path = _fresh_path(base)
        cfg.run.name = os.path.basename(path)
        messages.append(f"run.resume=false: {base} holds an earlier run, left untouched; starting fresh in {path}")
    try:
        os.makedirs(path, exist_ok=True)
        _lock(path)  # before anything in the folder changes
        if path == base and _has_run(base):
            changed = _check_same_model(base, cfg)
            if changed:
                keep = _fresh_path(os.path.join(base, f"config-{time.strftime('%Y%m%d-%H%M%S')}"), ".yaml")
                os.replace(os.path.join(base, "config.yaml"), keep)
                messages.append(f"config changed since the last launch ({'; '.join(changed)}); previous kept as {keep}")
        with open(os.path.join(path, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    except OSError as err:
        raise PhalanxError(
            f"run directory '{path}' is not writable ({err.strerror}); set run.dir to a writable folder"
        ) from None
    return path, messages
