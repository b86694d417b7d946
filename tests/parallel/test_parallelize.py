"""`parallelize` and the strategy registry: a data-parallel back end a user registers is the one the trainer
builds, steps and saves with, with no edit to the trainer (one process)."""

from __future__ import annotations

import torch

from phalanx.config import load_config
from phalanx.parallel import registry, validate
from phalanx.parallel.data_parallel import DDPStrategy
from phalanx.parallel.dist import DistContext
from phalanx.trainer import Trainer
from phalanx.trainer.rundir import prepare_run_dir
from tests.helpers import CONFIG, losses, run_overrides


class CountedDDP(DDPStrategy):
    """DDP that records which of its parts the trainer called."""

    calls: list[str] = []

    @classmethod
    def apply(cls, model, mesh, cfg):
        cls.calls.append("apply")
        return DDPStrategy.apply(model, mesh, cfg)

    @classmethod
    def step(cls, model, optimizer, max_norm, pp_group=None):
        cls.calls.append("step")
        return DDPStrategy.step(model, optimizer, max_norm, pp_group)

    @classmethod
    def state_dict(cls, model, optimizer):
        cls.calls.append("state_dict")
        return DDPStrategy.state_dict(model, optimizer)


def test_a_registered_data_parallel_back_end_is_what_the_trainer_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(registry._REGISTRY["data"], "counted", CountedDDP)
    monkeypatch.setattr(CountedDDP, "calls", [])
    cfg = validate(load_config(CONFIG, run_overrides(tmp_path, "train.steps=2", "parallel.dp_backend=counted")))
    run_dir, _ = prepare_run_dir(cfg)
    trainer = Trainer(cfg, DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), run_dir)
    assert trainer.data_parallel is CountedDDP
    trainer.fit()
    calls = CountedDDP.calls
    assert calls[0] == "apply" and calls.count("apply") == 1 and calls.count("step") == 2 and "state_dict" in calls
    assert sorted(losses(run_dir)) == [1, 2]
