"""Ray for `phalanx ray`: join a running cluster, or start a local one bound to loopback only."""

from __future__ import annotations

import os
from typing import Any, Optional


def loopback_only() -> None:
    """Makes Ray, in this process and the processes it starts, bind and advertise 127.0.0.1 only.

    `_node_ip_address="127.0.0.1"` alone is not enough: Ray replaces a loopback address by the host's
    routable one (`services.resolve_ip_for_localhost`); measured with ray 2.60 on a host with eth0
    192.0.2.2, GCS and raylet advertised 192.0.2.2 and listened on 0.0.0.0 / ::. In Ray's single-machine
    mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, its default on macOS and Windows) every process binds and
    advertises 127.0.0.1 (tests/helpers.py assert_loopback_only checks every socket)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read at import by Ray's own processes
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # this process may have imported ray before the variable was set


def start_local_ray(**options: Any) -> None:
    """A new local Ray instance on loopback only, without the dashboard. `address="local"` starts one
    instead of joining the instance that `ray start` (or a test's `Cluster`) last recorded in /tmp/ray."""
    import ray

    loopback_only()
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **options)


def connect(address: Optional[str], workers: int = 1) -> None:
    """Join a running cluster (`--address`, or RAY_ADDRESS as under `ray job submit`), else start a
    local one on loopback without the dashboard, with a CPU slot for each of `workers` (more workers than
    cores share them, as under torchrun, instead of waiting for slots that never come)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        start_local_ray(log_to_driver=True, num_cpus=max(os.cpu_count() or 1, workers))
