"""THOR training on a cluster: elastic worker ranges, and a run Ray Train gave up on (no Ray)."""

from __future__ import annotations

import pytest

from meddiff.config import load_config
from meddiff.errors import ConfigError


def test_elastic_training_worker_range():
    cfg = load_config(overrides=["thor.train.num_workers=2", "thor.train.min_workers=1"])
    assert (cfg.thor.train.min_workers, cfg.thor.train.num_workers) == (1, 2)
    with pytest.raises(
        ConfigError, match="every worker count"
    ):  # 1..3 workers: 3 does not split 16
        load_config(overrides=["thor.train.num_workers=3", "thor.train.min_workers=1"])


def test_a_training_run_ray_gave_up_on_is_one_clear_error(tmp_path):
    import ray.train

    from meddiff.errors import ClusterError, DataError
    from meddiff.training.driver import training_error

    run_dir = tmp_path / "ray" / "thor-train"
    lost = ray.train.WorkerGroupError(
        "rank 1 died", {1: RuntimeError("The actor died unexpectedly\nmore detail")}
    )
    err = training_error(lost, 2, "thor.train", run_dir)
    assert isinstance(err, ClusterError)
    message = str(err)
    assert (
        "thor.train.max_failures=2" in message
        and "worker 1: RuntimeError: The actor died" in message
    )
    assert "\n" not in message and str(run_dir) in message
    bad = ray.train.WorkerGroupError("bad data", {0: DataError("x.png: not a PNG")})
    user = training_error(bad, 2, "thor.train", run_dir)  # bad input: its own message
    assert isinstance(user, DataError) and str(user) == "x.png: not a PNG"
    assert training_error(ValueError("a bug"), 2, "thor.train", run_dir) is None
