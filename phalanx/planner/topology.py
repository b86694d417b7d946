"""The cluster as the cost model sees it: nodes x devices, two bandwidth levels, compute and memory.

Presets hold datasheet numbers (peak dense FLOP/s, memory, NVLink / NIC bandwidth) and an achieved
share of them that published runs reach (MFU around 40% for dense bf16 training; NCCL bus bandwidth
around 80% of the link). `phalanx plan --calibrate` replaces the guesses by measurements of this
machine (`phalanx/planner/calibrate.py`) and saves them as JSON for later plans.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

from phalanx.errors import ConfigError


@dataclass(frozen=True)
class Link:
    """alpha-beta: a message of n bytes takes latency_s + n / bandwidth (bytes/s per device)."""

    bandwidth: float
    latency_s: float

    def time(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth


@dataclass(frozen=True)
class Topology:
    nodes: int
    gpus_per_node: int
    device: str  # preset name, for the record
    peak_flops: float  # dense FLOP/s per device at the training dtype
    achieved: float  # share of peak_flops a training step reaches (MFU ceiling of the compute term)
    memory_bytes: float  # per device
    intra: Link  # between devices of one node (NVLink / shared memory)
    inter: Link  # between nodes, per device (its NIC or its share of one)
    overlap: float = 1.0  # share of backward compute that can hide data-parallel gradient / FSDP traffic
    optimizer_bytes_per_s: float = 1e12  # AdamW streams params, grads and two moments: memory bandwidth
    step_overhead_s: float = 0.0  # fixed per-step cost outside the model (launches, Python)
    microbatch_overhead_s: float = 0.0  # fixed cost of one micro-batch's forward + backward of the whole model
    # Ranks sharing CPU cores: contention[j - 1] = how much slower a rank computes while j ranks of its node
    # compute at once (`contention.slowdown`); empty: devices of their own (GPUs). `peak_flops * achieved` and
    # `microbatch_overhead_s` are then a rank's rate and fixed cost while it computes alone.
    contention: tuple[float, ...] = ()
    # Strided copies in a step's critical path that are neither FLOPs nor wire bytes: Ulysses' pack into the
    # all-to-all send buffer and unpack out of the receive buffer, FSDP2's copy-in / copy-out (latency_s is per copy).
    copy: Link = Link(1e12, 0.0)
    fsdp_call_s: float = 0.0  # fixed cost of one FSDP2 all-gather / reduce-scatter beyond the link's latency
    fsdp_param_s: float = 0.0  # extra clip + optimizer cost per step of one FSDP-sharded (DTensor) parameter
    # Fixed cost of a collective inside forward / backward (sp / ep all-to-alls) beyond its alpha-beta time: ranks
    # arrive apart and blocked ones wake up (0 on GPUs: kernels queue and the CPU runs ahead).
    sync_s: float = 0.0
    calibrated: bool = False

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @staticmethod
    def from_dict(d: dict) -> "Topology":
        d = dict(d)
        d["intra"], d["inter"] = Link(**d["intra"]), Link(**d["inter"])
        if "copy" in d:
            d["copy"] = Link(**d["copy"])
        d["contention"] = tuple(d.get("contention", ()))
        names = {f.name for f in fields(Topology)}
        return Topology(**{k: v for k, v in d.items() if k in names})

    def resized(self, nodes: int, gpus_per_node: int) -> "Topology":
        return replace(self, nodes=nodes, gpus_per_node=gpus_per_node)


GB = 1e9
# device: (bf16 dense FLOP/s, fp32 (tf32) FLOP/s, memory bytes, intra-node link bytes/s per device, HBM bytes/s)
DEVICES: dict[str, tuple[float, float, float, float, float]] = {
    "H100": (989.4e12, 494.7e12, 80 * 2**30, 450 * GB, 3.35e12),  # NVLink 4: 900 GB/s bidirectional
    "H200": (989.4e12, 494.7e12, 141 * 2**30, 450 * GB, 4.8e12),
    "A100": (312e12, 156e12, 80 * 2**30, 300 * GB, 2.0e12),  # NVLink 3: 600 GB/s bidirectional
    "L40S": (362.1e12, 181e12, 48 * 2**30, 32 * GB, 0.86e12),  # PCIe 4 x16, no NVLink
    "cpu": (1e11, 1e11, 16 * 2**30, 5 * GB, 20e9),  # placeholder; calibrate a CPU before trusting a plan
}
# NIC bytes/s per device (one NIC per GPU, rail-optimised, as DGX / HGX clusters are built)
NICS: dict[str, float] = {"ndr400": 50 * GB, "hdr200": 25 * GB, "eth100": 12.5 * GB, "eth25": 3.125 * GB,
                          "none": 5 * GB}


def preset(device: str = "H100", nic: str = "ndr400", nodes: int = 1, gpus_per_node: int = 8,
           dtype: str = "bf16") -> Topology:
    """A topology from datasheet numbers; see the module docstring for the achieved shares."""
    if device not in DEVICES:
        raise ConfigError(f"--device={device!r} is not one of {', '.join(DEVICES)}; pick one or run --calibrate")
    if nic not in NICS:
        raise ConfigError(f"--nic={nic!r} is not one of {', '.join(NICS)}; pick the closest")
    bf16, fp32, memory, nvlink, hbm = DEVICES[device]
    cpu = device == "cpu"
    return Topology(
        nodes=nodes, gpus_per_node=gpus_per_node, device=device,
        peak_flops=bf16 if dtype == "bf16" else fp32, achieved=0.4 if not cpu else 1.0, memory_bytes=memory,
        intra=Link(0.8 * nvlink, 5e-6 if not cpu else 50e-6),
        inter=Link(0.8 * NICS[nic], 15e-6 if not cpu else 100e-6),
        overlap=0.0 if cpu else 1.0,  # gloo on a few cores overlaps nothing worth counting
        optimizer_bytes_per_s=hbm * 0.7,
        copy=Link(hbm * 0.35, 0.0),  # a copy reads and writes: half the achieved memory bandwidth
    )


def load_topology(path: str, nodes: Optional[int] = None, gpus_per_node: Optional[int] = None) -> Topology:
    """A saved (calibrated) topology, resized to `nodes` x `gpus_per_node` when given."""
    if not os.path.isfile(path):
        raise ConfigError(f"topology file '{path}' does not exist; create it with `phalanx plan CONFIG --calibrate`")
    try:
        with open(path) as f:
            topo = Topology.from_dict(json.load(f))
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"topology file '{path}' is not a saved topology ({err}); recreate it with --calibrate") from None
    return topo.resized(nodes or topo.nodes, gpus_per_node or topo.gpus_per_node)


def save_topology(topo: Topology, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(topo.to_json() + "\n")
