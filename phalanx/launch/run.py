"""One rank's run: start its process groups, train, let go. `phalanx train` (each torchrun rank, or one
process) and a Ray `TrainWorker` both run a rank through `run_rank`."""

from __future__ import annotations

import sys
import traceback
from typing import TYPE_CHECKING

from phalanx.errors import ConfigError, PhalanxError
from phalanx.parallel.dist import DistContext, broadcast_object, env_world, shutdown, start_process_groups

if TYPE_CHECKING:
    from phalanx.config import PhalanxConfig


def init_distributed(cfg) -> DistContext:
    """This rank's process groups and mesh, in the rank order the planner picks for `parallel.order`."""
    from phalanx.planner.placement import mesh_order

    return start_process_groups(cfg, lambda world, per_node: mesh_order(cfg, world, per_node))


def rank_config(config_path: str, overrides: list[str]) -> PhalanxConfig:
    """The config of this rank's run: `config_path` with `overrides`, validated for the world size of the
    launcher's environment (torchrun's, or the Ray controller's)."""
    from phalanx.config import load_config
    from phalanx.parallel import validate

    return validate(load_config(config_path, overrides), env_world()[1])


def run_rank(cfg) -> int:
    """Train one rank of a validated config; returns 0, or raises what stopped it. A layout the planner predicts
    will not fit this rank's memory is refused before any process group starts."""
    import os

    from phalanx.launch.preflight import check_memory
    from phalanx.parallel.layout import Layout

    check_memory(cfg, Layout.from_config(cfg), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    ctx = init_distributed(cfg)
    try:
        fit(cfg, ctx)
    except BaseException as err:
        # A failed rank lets its process groups go before it returns. Gloo closes a group's sockets only
        # once nothing holds the group, and the traceback's frames hold the trainer (its DDP/FSDP wrappers,
        # pipeline stages). Left open, they keep every rank that is not next to the dead one waiting out
        # fault.collective_timeout_s; closed, each rank's failure reaches its neighbours in milliseconds.
        traceback.clear_frames(err.__traceback__)
        ctx.mesh = None
        shutdown()
        raise
    shutdown()
    return 0


def fit(cfg, ctx: DistContext) -> None:
    """The run folder (decided once, by rank 0), then the Trainer's loop."""
    import torch.distributed

    from phalanx.trainer import Trainer
    from phalanx.trainer.rundir import prepare_run_dir

    # Rank 0 decides the folder (fresh or resumed) once; the others follow, or raise its error.
    outcome = None
    if ctx.is_main:
        try:
            outcome = prepare_run_dir(cfg)
        except PhalanxError as err:
            outcome = err
    outcome = broadcast_object(outcome, ctx)
    if isinstance(outcome, PhalanxError):
        raise outcome
    run_dir, messages = outcome
    cfg.run.name = run_dir.rstrip("/").rsplit("/", 1)[-1]
    if ctx.is_main:
        for message in messages:
            print(message, flush=True)
    Trainer(cfg, ctx, run_dir).fit()
    if ctx.distributed:
        torch.distributed.barrier()  # no rank tears the process group down while a peer still uses it


def report_error(err: PhalanxError) -> int:
    """Print a user error as one line (a config error once per run, others with their rank); its exit code."""
    rank, world, _ = env_world()
    # A config error is the same on every rank: say it once.
    if rank == 0 or not isinstance(err, ConfigError):
        prefix = f"[rank {rank}] " if world > 1 and not isinstance(err, ConfigError) else ""
        print(f"phalanx: error: {prefix}{err}", file=sys.stderr)
    return err.exit_code
