"""The planner: rank placement and `parallel.order`, the layout search, `phalanx plan` and its errors."""

from __future__ import annotations

import json
import time

import pytest

from phalanx.config import load_config
from phalanx.errors import ConfigError
from phalanx.parallel import validate
from phalanx.parallel.layout import Layout
from phalanx.parallel.mesh import MESH_ORDER
from phalanx.planner.cost import memory, step_cost
from phalanx.planner.placement import best_order, comm_times, mesh_order
from phalanx.planner.plan import plan
from phalanx.planner.topology import preset
from phalanx.planner.traffic import traffic_table
from tests.helpers import CONFIG, TINY

LLAMA_8B = ["model.vocab_size=128256", "model.d_model=4096", "model.n_layers=32", "model.n_heads=32",
            "model.n_kv_heads=8", "model.ffn_dim=14336", "model.max_seq_len=8192", "data.seq_len=8192",
            "train.batch_size=1024", "train.micro_batch_size=1", "train.dtype=bf16", "model.rope_theta=500000"]


def test_rank_order_numbers_ranks_row_major_over_the_order() -> None:
    layout = Layout(dp=2, sp=2, ep=1, pp=2, order=("sp", "pp", "dp"), world_size=8)
    grid = layout.rank_grid()
    assert grid == [[[0, 4], [1, 5]], [[2, 6], [3, 7]]]  # [pp][dp][sp]: dp fastest, then pp, sp slowest
    for pp, dp, sp in ((a, b, c) for a in range(2) for b in range(2) for c in range(2)):
        assert layout.coords(grid[pp][dp][sp]) == {"pp": pp, "dp": dp, "sp": sp}
    assert layout.group_ranks("dp") == [0, 1]  # dp innermost: neighbours
    assert layout.group_ranks("dp_sp") == [0, 4, 1, 5]
    assert Layout(dp=2, sp=2, ep=1, pp=2, world_size=8).coords(1) == {"pp": 0, "dp": 0, "sp": 1}


def test_bad_order_is_refused_with_the_value() -> None:
    with pytest.raises(ConfigError, match="parallel.order='dp,dp,sp'.*permutation of pp,dp,sp"):
        validate(load_config(CONFIG, [*TINY, "parallel.order=dp,dp,sp"]), 1)


def innermost(order: tuple[str, ...], layout: Layout) -> str:
    """The fastest-varying dimension with more than one rank."""
    return [d for d in order if getattr(layout, d) > 1][-1]


def test_placement_keeps_the_heaviest_traffic_inside_a_node() -> None:
    topo = preset("H100", nodes=2, gpus_per_node=2)
    # A narrow model on long sequences with many micro-batches: pipeline sends outweigh the gradient
    # all-reduce, so pp goes innermost (phalanx's default puts dp there and pp across nodes).
    heavy_pp = ["model.max_seq_len=1024", "data.seq_len=1024", "parallel.pp=2", "train.micro_batch_size=1"]
    cfg = validate(load_config(CONFIG, [*TINY, *heavy_pp]), 4)
    layout = Layout.from_config(cfg)
    order = best_order(cfg, layout, topo)
    table = traffic_table(cfg, layout)
    assert table["pp"] > table["dp_sp"] and innermost(order, layout) == "pp", (order, table)
    assert sum(comm_times(cfg, layout.with_(order=order), topo).values()) < sum(comm_times(cfg, layout, topo).values())
    # FSDP of a wide model: the dp all-gathers dominate and the default already keeps dp inside a node
    wide = validate(load_config(CONFIG, [*TINY, "model.d_model=512", "model.n_heads=8", "parallel.pp=2",
                                         "parallel.dp_backend=fsdp", "train.micro_batch_size=1"]), 4)
    assert innermost(best_order(wide, Layout.from_config(wide), topo), Layout.from_config(wide)) == "dp"


def test_order_auto_uses_the_planner_only_across_nodes() -> None:
    cfg = validate(load_config(CONFIG, [*TINY, "model.max_seq_len=1024", "data.seq_len=1024", "parallel.pp=2",
                                        "train.micro_batch_size=1", "parallel.order=auto"]), 4)
    assert mesh_order(cfg, 4, 4) == MESH_ORDER  # one node: every order is as good
    chosen = mesh_order(cfg, 4, 2)
    assert chosen == best_order(cfg, Layout.from_config(cfg), preset(nodes=2, gpus_per_node=2)) != MESH_ORDER
    cfg.parallel.order = "dp,sp,pp"
    assert mesh_order(cfg, 4, 2) == ("dp", "sp", "pp")


def test_memory_model_pipeline_in_flight_and_activation_checkpointing() -> None:
    cfg = validate(load_config(CONFIG, [*TINY, "model.n_layers=4", "parallel.pp=2", "train.micro_batch_size=1"]), 2)
    one_f_one_b = Layout.from_config(cfg)
    gpipe = one_f_one_b.with_(pp_schedule="gpipe")
    assert memory(cfg, gpipe, 0).activations > memory(cfg, one_f_one_b, 0).activations > 0
    assert memory(cfg, one_f_one_b.with_(activation_checkpointing=True), 0).activations < \
        memory(cfg, one_f_one_b, 0).activations
    topo = preset("cpu", nodes=1, gpus_per_node=2)
    ac = step_cost(cfg, one_f_one_b.with_(activation_checkpointing=True), topo)
    assert ac.compute_s > step_cost(cfg, one_f_one_b, topo).compute_s  # the recomputed forward


def test_a_layout_predicted_not_to_fit_is_refused_before_any_process_group(capsys) -> None:
    """Llama 8B on one CPU process: the planner's estimate (about 120 GiB of fp32 state alone) exceeds this
    host; `phalanx train` says so in one line naming the fix, without starting anything."""
    from phalanx.cli import main
    from phalanx.launch.preflight import check_memory

    big = [*TINY, *LLAMA_8B, "train.batch_size=8", "data.seq_len=128", "train.dtype=fp32"]
    assert main(["train", CONFIG, *big]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs about" in err and "GiB per rank" in err, err
    assert "phalanx plan" in err and "parallel.memory_check=false" in err, err
    cfg = validate(load_config(CONFIG, [*big, "parallel.memory_check=false"]))
    check_memory(cfg, Layout.from_config(cfg), 1)  # the escape hatch
    tiny = validate(load_config(CONFIG, TINY))
    check_memory(tiny, Layout.from_config(tiny), 4)


def test_plan_for_1024_devices_runs_in_seconds() -> None:
    cfg = load_config(CONFIG, LLAMA_8B)
    start = time.perf_counter()
    result = plan(cfg, preset("H100", nodes=128, gpus_per_node=8))
    print(f"planned {result.considered} layouts for 128 x 8 H100 in {time.perf_counter() - start:.1f} s")
    best = result.best
    assert best is not None and result.considered > 100
    assert best.fits and best.memory.total < 80 * 2**30
    assert 0.05 < best.mfu < 0.6  # compute-bound at an achieved 40% of peak, minus what is exposed
    # too little memory for any layout: the plan says so instead of recommending one
    assert plan(cfg, preset("L40S", nodes=1, gpus_per_node=2)).best is None


def phalanx_plan(capsys, *args: str) -> tuple[int, str, str]:
    """`phalanx plan CONFIG ARGS` in this process (the CLI's main, as the console script calls it)."""
    from phalanx.cli import main

    code = main(["plan", CONFIG, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_cli_prints_the_table_and_writes_a_config(tmp_path, capsys) -> None:
    out = tmp_path / "tiny.plan.yaml"
    code, stdout, stderr = phalanx_plan(capsys, "--nodes", "2", "--gpus-per-node", "2", "--top", "3", "--write",
                                        str(out))
    assert code == 0, stderr
    assert "recommended:" in stdout and "bytes/step per dim" in stdout, stdout
    cfg = validate(load_config(str(out)), 4)  # the written config trains at the planned world size
    assert stdout.split("recommended: ")[1].startswith(Layout.from_config(cfg).name())
    code, _, stderr = phalanx_plan(capsys, "--nodes", "2", "--gpus-per-node", "2", "--write", str(out))
    assert code == 2 and "--force" in stderr  # nothing written over silently
    # a layout with activation checkpointing selects it in the config it writes (the trainer runs it)
    ac = Layout.from_config(cfg).with_(activation_checkpointing=True)
    assert ac.apply(cfg).train.activation_checkpointing == "full" and Layout.from_config(ac.apply(cfg)) == ac


@pytest.mark.parametrize("args,words", [
    (["--nodes", "0"], ["--nodes=0"]),
    (["--device", "B300"], ["--device='B300'", "H100"]),
    (["--topology", "/nonexistent/topo.json"], ["does not exist", "--calibrate"]),
])
def test_plan_cli_errors_are_one_line(args: list[str], words: list[str], capsys) -> None:
    code, _, stderr = phalanx_plan(capsys, *args)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1, stderr
    for word in words:
        assert word in stderr, stderr


@pytest.mark.slow
def test_calibrate_measures_this_machine(tmp_path, capsys) -> None:
    path = tmp_path / "topology.json"
    code, _, stderr = phalanx_plan(capsys, *TINY, "--calibrate", "--gpus-per-node", "2", "--topology", str(path),
                                   "--top", "2")
    assert code == 0, stderr
    topo = json.loads(path.read_text())
    assert topo["calibrated"] and topo["gpus_per_node"] == 2
    assert topo["peak_flops"] > 0 and topo["intra"]["bandwidth"] > 0 and topo["optimizer_bytes_per_s"] > 0
    code, stdout, stderr = phalanx_plan(capsys, *TINY, "--topology", str(path), "--gpus-per-node", "2", "--nodes", "1")
    assert code == 0 and "(calibrated)" in stdout, stderr
