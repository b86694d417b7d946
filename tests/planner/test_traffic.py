"""Predicted per-step collective bytes and state memory equal what phalanx measures, layout by layout.

Each layout runs the real trainer in 2-4 gloo processes (`phalanx.planner.measure`): bytes per
(kind, mesh dimension) come from `phalanx/telemetry/comm.py`, memory from the tensors each rank holds.
The predictions (`phalanx.planner.traffic`, `phalanx.planner.cost`) come from shapes only.
"""

from __future__ import annotations

import pytest

from phalanx.config import load_config
from phalanx.parallel import validate
from phalanx.parallel.layout import Layout
from phalanx.planner.cost import state_memory
from phalanx.planner.measure import measure_layout
from phalanx.planner.traffic import step_traffic
from tests.helpers import CONFIG, TINY

MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_dim=32"]
# (world, overrides): dp, sp, ep and pp mixes over ddp and fsdp, every collective phalanx issues
LAYOUTS = [
    (2, ["parallel.dp=2"]),
    (2, ["parallel.pp=2", "parallel.dp=1", "model.n_layers=4", "parallel.pp_schedule=interleaved",
         "train.micro_batch_size=2"]),
    (4, ["parallel.dp=2", "parallel.sp=2", "parallel.dp_backend=fsdp", "parallel.order=sp,pp,dp"]),
    (4, [*MOE, "parallel.dp=4", "parallel.ep=2", "train.micro_batch_size=1"]),
    (4, [*MOE, "parallel.dp=2", "parallel.sp=2", "parallel.ep=2", "parallel.dp_backend=fsdp",
         "train.micro_batch_size=2"]),
    (4, ["parallel.pp=2", "parallel.dp=2", "parallel.dp_backend=fsdp", "model.n_layers=4", "train.micro_batch_size=1"]),
    (4, [*MOE, "parallel.pp=2", "parallel.sp=2", "parallel.dp=1", "model.n_layers=4", "parallel.pp_schedule=gpipe",
         "model.moe.capacity_factor=1.5", "train.micro_batch_size=2"]),
]
# Expert all-to-alls carry each rank's routed rows out and the rows routed to it back: the second half
# depends on the router, so per rank only the ep group's total is fixed (what the cost model predicts).
ROUTED = {"all_to_all/ep"}


@pytest.mark.slow
@pytest.mark.parametrize("world,overrides", LAYOUTS, ids=[" ".join(o[-3:]) for _, o in LAYOUTS])
def test_predicted_bytes_and_memory_equal_measured(world: int, overrides: list[str]) -> None:
    overrides = [*TINY, *overrides]
    cfg = validate(load_config(CONFIG, overrides), world)
    layout = Layout.from_config(cfg)
    ranks = measure_layout(CONFIG, overrides, world)
    routed_pred, routed_meas = 0, 0
    for measured in ranks:
        pp_rank = layout.coords(measured["rank"])["pp"]
        predicted = step_traffic(cfg, layout, pp_rank)
        assert predicted, "every layout here communicates"
        assert set(predicted) == set(measured["comm"]), (measured["rank"], sorted(predicted), sorted(measured["comm"]))
        for key, flow in predicted.items():
            got = measured["comm"][key]
            if key in ROUTED:
                routed_pred, routed_meas = routed_pred + flow.bytes, routed_meas + got["bytes"]
            else:
                assert got["bytes"] == flow.bytes, (measured["rank"], key, got, flow)
            if flow.calls is not None:
                assert got["calls"] == flow.calls, (measured["rank"], key, got, flow)
        mem = state_memory(cfg, layout, pp_rank)
        for part in ("params", "grads", "optim"):
            assert measured["memory"][part] == pytest.approx(getattr(mem, part), rel=0.05), (measured["rank"], part)
    assert routed_meas == routed_pred
