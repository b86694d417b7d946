"""The failure-free reference runs of the Ray tests, trained in `make test`'s parallel session.

The Ray tests run alone afterwards (marked serial: they time failures); each compares its run with a reference
trained on pooled local ranks. Asked for here first, with the same arguments, those references are trained
beside other tests instead of alone, and the serial session finds them (tests/conftest.reference_run)."""

from __future__ import annotations

import pytest

from tests.helpers import CONFIG, final_checkpoint, losses

pytest.importorskip("ray")
from tests.launch import test_ray as ray_tests, test_ray_cluster as cluster_tests  # noqa: E402  (the same requests)

REFERENCES = {
    "ray-ddp2": (2, ray_tests.BASE, ray_tests.STEPS),
    "ray-fsdp-experts": (2, [*ray_tests.BASE, *ray_tests.FSDP_EXPERTS], ray_tests.STEPS),
    "ray-cluster-3": (3, cluster_tests.BASE, cluster_tests.STEPS),
}


@pytest.mark.parametrize("name", REFERENCES)
def test_the_serial_tests_reference_runs_train_to_their_end(name, reference_run):
    world, overrides, steps = REFERENCES[name]
    run = reference_run(CONFIG, world, *overrides)
    assert sorted(losses(run)) == list(range(1, steps + 1))
    assert final_checkpoint(run, steps).is_dir()
