"""SEG thresholds: the healthy quantile, keyed by the inference settings, kept in the model folder
(the registry-tag path runs in tests/integration/test_thor_volumes.py); and the shipped model's
own calibration for the recommended fast setting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from meddiff.config import load_config
from meddiff.errors import DataError
from meddiff.thor import calibrate
from meddiff.thor.detect import plan_for
from meddiff.thor.shipped import SHIPPED_DIR


def test_threshold_is_the_quantile_over_brain_pixels_only():
    rng = np.random.default_rng(0)
    images = np.zeros((4, 16, 16), np.float32)
    images[:, 4:12, 4:12] = 0.5  # the brain; the rest is background (0)
    maps = rng.random((4, 16, 16)).astype(np.float32)
    maps[images == 0] = 0.0  # background maps are low: they must not pull the threshold down
    threshold, pixels = calibrate.healthy_threshold(maps, images, 0.95)
    assert pixels == 4 * 64
    assert np.mean(maps[images > 0] > threshold) <= 0.05 + 1e-9
    assert threshold in maps[images > 0]  # a value of the data, the smallest that qualifies
    assert np.mean(maps[images > 0] >= threshold) > 0.05
    with pytest.raises(DataError, match="no non-zero pixel"):
        calibrate.healthy_threshold(maps, np.zeros_like(images), 0.95)


def test_the_key_follows_the_settings_that_change_the_map():
    cfg = load_config("tiny", None, ["thor.infer.stride=25", "thor.infer.draws=3"])
    plan = plan_for(cfg, str(SHIPPED_DIR))
    same = plan_for(cfg.model_copy(), str(SHIPPED_DIR))
    other = plan_for(load_config("tiny", None, ["thor.infer.stride=25"]), str(SHIPPED_DIR))
    assert calibrate.plan_key(plan) == calibrate.plan_key(same)
    assert calibrate.plan_key(plan) != calibrate.plan_key(other)
    # batch size and concurrency change nothing in a map: not in the key
    batch = load_config("tiny", None, ["thor.infer.stride=25", "thor.infer.draws=3",
                                       "thor.infer.batch_size=5"])  # fmt: skip
    assert calibrate.plan_key(plan_for(batch, str(SHIPPED_DIR))) == calibrate.plan_key(plan)


def test_a_model_folder_keeps_one_record_per_setting(tmp_path):
    cfg = load_config("tiny")
    plan = {"method": "thor", "schedule": "fast", "image_size": 64}
    record = {"threshold": 0.4, "quantile": 0.95}
    calibrate._store(str(tmp_path), cfg, calibrate.plan_key(plan), record)
    calibrate._store(str(tmp_path), cfg, calibrate.plan_key({**plan, "draws": 3}), record)
    data = json.loads((tmp_path / calibrate.CALIBRATION_FILE).read_text())
    assert data["format"] == calibrate.FORMAT and len(data["calibrations"]) == 2
    found = calibrate.lookup(cfg, str(tmp_path), tmp_path, plan)
    assert found["threshold"] == 0.4 and found["key"] == calibrate.plan_key(plan)
    assert calibrate.lookup(cfg, str(tmp_path), tmp_path, {**plan, "draws": 5}) is None
    tags = calibrate.version_tags(tmp_path)
    assert set(tags) == {calibrate.TAG_PREFIX + k for k in data["calibrations"]}
    (tmp_path / calibrate.CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(DataError, match="thor_calibration.json: not valid JSON"):
        calibrate.read_file(tmp_path)


def test_the_shipped_model_is_calibrated_for_the_recommended_fast_setting():
    cfg = load_config("tiny", None, ["thor.infer.stride=25", "thor.infer.draws=3"])
    found = calibrate.lookup(cfg, str(SHIPPED_DIR), SHIPPED_DIR, plan_for(cfg, str(SHIPPED_DIR)))
    assert found is not None and 0 < found["threshold"] < 1 and found["quantile"] == 0.95
    assert "meddiff thor calibrate" in found["command"]
