"""THOR training on a cluster: elastic worker ranges, and a run Ray Train gave up on (no Ray)."""

from __future__ import annotations

import pytest

from meddiff.config import load_config
from meddiff.errors import ConfigError


def test_elastic_training_worker_range():
    from meddiff.thor.train import _worker_count

    cfg = load_config(overrides=["thor.train.num_workers=2", "thor.train.min_workers=1"])
    assert _worker_count(cfg.thor.train) == (1, 2)
    assert _worker_count(load_config(overrides=["thor.train.num_workers=2"]).thor.train) == 2
    with pytest.raises(
        ConfigError, match="every worker count"
    ):  # 1..3 workers: 3 does not split 16
        load_config(overrides=["thor.train.num_workers=3", "thor.train.min_workers=1"])


def test_a_training_run_ray_gave_up_on_is_one_clear_error(tmp_path):
    import ray.train

    from meddiff.errors import ClusterError, DataError
    from meddiff.thor.train import _fit

    class Trainer:
        def __init__(self, err):
            self.err = err

        def fit(self):
            raise self.err

    lost = ray.train.WorkerGroupError(
        "rank 1 died", {1: RuntimeError("The actor died unexpectedly\nmore detail")}
    )
    with pytest.raises(ClusterError) as err:
        _fit(Trainer(lost), tmp_path, 2)
    message = str(err.value)
    assert "max_failures=2" in message and "worker 1: RuntimeError: The actor died" in message
    assert "\n" not in message and str(tmp_path / "ray" / "thor-train") in message
    bad = ray.train.WorkerGroupError("bad data", {0: DataError("x.png: not a PNG")})
    with pytest.raises(DataError, match=r"^x\.png: not a PNG$"):  # bad input: its own message
        _fit(Trainer(bad), tmp_path, 2)
