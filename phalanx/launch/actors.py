"""Ray actors: a `TrainWorker` per device runs one rank's trainer; a `KeeperActor` per node holds the
node's snapshot memory (the same `Keeper` the torchrun path starts as a process). Imported only by
the controller: `import phalanx` never imports ray."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from typing import Any, Optional

import ray


@ray.remote(num_cpus=0)
class KeeperActor:
    """Serves snapshot memory on its node until the controller kills it (at the run's end) or the node
    goes; losing the node loses it, as it should. It never lingers out: between attempts no trainer is
    attached, and a replacement node may take longer than checkpoint.keeper_linger_s to arrive
    (fault.wait_for_nodes_s), but the memory it holds is what the next attempt restores from."""

    def __init__(self, run_id: str, node: int, secret_hex: str, host: str, keeper_dir: str, warm: bool = False):
        from phalanx.checkpoint.keeper import Keeper, discovery_file
        from phalanx.checkpoint.link import default_keeper_dir

        # checkpoint.keeper_host=auto: this node's Ray address (loopback on a local cluster), which its peers
        # on other nodes reach; the driver cannot decide it, it may not be on this node at all
        host = ray.util.get_node_ip_address() if host == "auto" else host
        keeper_dir = keeper_dir or default_keeper_dir()  # where this node's trainers look (same rule)
        self.keeper = Keeper(run_id, node, bytes.fromhex(secret_hex), host, keeper_dir, linger_s=math.inf)
        if warm:  # the controller knows the run: torch loads beside the workers' start, not after it
            self.keeper.warm_up()
        self.discovery = discovery_file(keeper_dir, run_id, node)
        self.serving = threading.Thread(target=self.keeper.serve, daemon=True)
        self.serving.start()

    def alive(self) -> int:
        """An answer at once: the actor, and so its node, is up (whether the keeper still serves or the
        run's end released it). `ping` is for the start."""
        return os.getpid()

    def drain(self, timeout_s: float) -> int:
        """Waits at most `timeout_s` for the persistent writes the keeper has in hand (a run that gives up
        keeps what its keepers were writing); returns how many are left."""
        deadline = time.monotonic() + timeout_s
        while self.keeper.persisting and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.keeper.persisting

    def ping(self) -> int:
        """The keeper's pid, once it listens: a trainer that looked for it earlier would find no discovery
        file and start a keeper of its own for the node. Raises when it does not serve (it stopped: a
        trainer released it), so the controller starts another."""
        deadline = time.monotonic() + 30
        while self.serving.is_alive() and time.monotonic() < deadline:
            try:
                with open(self.discovery) as f:
                    if json.load(f).get("pid") == os.getpid():
                        return os.getpid()
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        raise RuntimeError(f"the keeper of node {self.keeper.node} does not serve (discovery file {self.discovery})")


@ray.remote(max_concurrency=4)  # heartbeats are answered while `run` trains
class TrainWorker:
    def where(self) -> tuple[str, str]:
        """(Ray node id, node IP address)."""
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def free_port(self) -> int:
        """A port free on this node's Ray address, the one rank 0's store will listen on (`parallel/dist.py`);
        probed there only, so a loopback cluster never binds another interface, even briefly."""
        from phalanx.net import bound_socket

        with bound_socket(ray.util.get_node_ip_address(), 0) as s:
            return s.getsockname()[1]

    def run(self, config_path: str, overrides: list[str], env: dict[str, str]) -> tuple[int, str]:
        """One rank of `phalanx train CONFIG OVERRIDES`: its exit code and, for a user error (printed, like
        the CLI), its message, which the controller's failure names."""
        os.environ.update(env)
        from phalanx.errors import PhalanxError
        from phalanx.telemetry import health

        health.HEALTH = health.Health(enabled=True)  # a reused worker starts counting afresh
        from phalanx.launch.run import rank_config, report_error, run_rank

        try:
            return run_rank(rank_config(config_path, overrides)), ""
        except PhalanxError as err:
            return report_error(err), str(err)

    def warm(self, env: dict[str, str]) -> None:
        """A spare's imports, done before it replaces a failed rank (`standby.py`), with `run`'s environment."""
        os.environ.update(env)
        import phalanx.launch.run  # noqa: F401  (torch)
        import phalanx.trainer  # noqa: F401
        import phalanx.trainer.rundir  # noqa: F401

    def heartbeat(self) -> dict[str, Any]:
        from phalanx.telemetry import health

        return health.HEALTH.snapshot()


def node_index_of(node_id: str, known: dict[str, int]) -> int:
    """Stable small integers for Ray node ids (a replacement node gets a new one)."""
    if node_id not in known:
        known[node_id] = len(known)
    return known[node_id]


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def kill(actor: Optional[Any]) -> None:
    if actor is not None:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass
