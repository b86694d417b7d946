"""Loss curves equal one process: one curve per data-parallel back end and per parallel kind, each from a shipped
config; the one-step parity tests (tests/parallel) cover every other mix. The curves are trained on pooled local
ranks (tests/helpers.train_local: the same code as a torchrun rank, no torchrun). A launch under torchrun that
is SIGKILLed whole and relaunched, compared bit for bit with the pp2xdp2 curve: tests/checkpoint/test_recovery.py.
(ZeRO's exact resume is not claimed: one run in four of a SIGKILL test with ZeRO-3 ended 1e-8 away from the
uninterrupted run, in tok_embeddings, while resuming cleanly stopped ZeRO-3 runs was bitwise equal.)"""

from __future__ import annotations

import pytest

from tests.helpers import REPO, losses, metrics

pytestmark = pytest.mark.slow

STEPS = 20
# persisted every 4 steps: the resume tests start from copies of these runs back at step 16, or 12 (a persist is a
# keeper's write, and ZeRO's snapshot a gather of its partitions: every one is seconds of a loaded machine)
COMMON = [f"train.steps={STEPS}", "checkpoint.persist_every=4", "train.batch_size=8", "train.micro_batch_size=2"]
# ZeRO's run persists at step 12 only (and at its end): its snapshot is a gather of its partitions, taken at persist
# steps only, and a persist requested while the keeper still writes the previous one is skipped
ZERO2 = ["checkpoint.persist_every=12"]
ONE_PROCESS = ["parallel.dp=1", "parallel.sp=1", "parallel.ep=1", "parallel.pp=1", "parallel.dp_backend=ddp"]

# layout -> (config, processes, overrides). fp32 on CPU: the ranks sum the same numbers in a different
# order, so losses agree to rounding; 1e-5 relative holds over 20 steps (1e-4 for pipelines).
LAYOUTS = {
    "ddp2": ("tiny.yaml", 2, []),
    "zero2": ("tiny_zero.yaml", 2, ZERO2),
    "fsdp2xsp2": ("tiny_fsdp_sp.yaml", 4, []),
    "moe-ep2xdp2": ("tiny_moe_ep.yaml", 4, []),
    "pp2xdp2": ("tiny_pp.yaml", 4, []),
}


def _run(reference_run, layout: str, one: bool = False):
    """A failure-free run of `layout` (or of its model on one process), on pooled local ranks."""
    config, nproc, extra = LAYOUTS[layout]
    config = REPO / "configs" / config
    if one:
        return reference_run(config, 1, *COMMON, *extra, *ONE_PROCESS)
    return reference_run(config, nproc, *COMMON, *extra)


def shared(name: str) -> pytest.MarkDecorator:
    """Tests that share the reference runs of layout `name` run on one pytest-xdist worker (`--dist loadgroup`):
    each worker trains its own references, so the layout's runs are trained once."""
    return pytest.mark.xdist_group(name=f"reference-{name}")


@pytest.mark.parametrize("layout", [pytest.param(name, marks=shared(name)) for name in LAYOUTS])
def test_loss_curve_matches_one_process(layout, reference_run):
    run_dir = _run(reference_run, layout)
    one, got = losses(_run(reference_run, layout, one=True)), losses(run_dir)
    assert sorted(got) == sorted(one) == list(range(1, STEPS + 1))
    rel = 1e-4 if layout.startswith("pp") else 1e-5
    for step, loss in one.items():
        assert got[step] == pytest.approx(loss, rel=rel), f"step {step}: {loss} vs {got[step]}"
    assert one[STEPS] < 0.8 * one[1]  # and it learned something
    last = metrics(run_dir)[-1]
    if layout.startswith("moe"):
        assert last["moe_aux_loss"] > 0.9 and last["moe_imbalance"] >= 1.0 and last["moe_dropped"] == 0.0
        assert last["moe_a2a_bytes"] > 0
    if layout.startswith("pp"):
        assert 0.0 < last["pp_bubble"] < 1.0 and 0.0 < last["pp_bubble_theory"] < 1.0
        assert len(last["pp_busy_s"]) == len(last["pp_idle_s"]) == 2
