"""Every process of the job finds the instance the driver started, never another Ray on the
machine: workers and actors get its address as RAY_ADDRESS (Ray Train's helper actors and Ray
Data's hang detector look the cluster up by themselves and would otherwise fail with "Found
multiple active Ray instances" when another Ray runs beside it)."""

from __future__ import annotations

import os

import ray


@ray.remote(num_cpus=0)
def _lookup() -> tuple[str | None, str]:
    from ray._private.services import canonicalize_bootstrap_address_or_die

    return os.environ.get("RAY_ADDRESS"), canonicalize_bootstrap_address_or_die(None)


@ray.remote(num_cpus=0)
class _Helper:
    def lookup(self) -> str | None:
        return os.environ.get("RAY_ADDRESS")


def test_workers_and_actors_use_the_instance_the_driver_started():
    gcs = ray.get_runtime_context().gcs_address
    assert os.environ["RAY_ADDRESS"] == gcs  # for processes the driver starts itself
    env, found = ray.get(_lookup.remote())
    assert env == gcs and found == gcs
    helper = _Helper.remote()
    try:
        assert ray.get(helper.lookup.remote()) == gcs
    finally:
        ray.kill(helper)
