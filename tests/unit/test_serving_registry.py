"""Registry aliases for serving: resolve to a version, promote, roll back, clear errors."""

from __future__ import annotations

import pytest

from meddiff.config import load_config
from meddiff.errors import ModelError
from meddiff.tracking import register_model, start_run
from meddiff.tracking.aliases import parse_ref, promote, resolve, rollback


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    cfg = load_config("tiny")
    d = tmp_path_factory.mktemp("m")
    (d / "weights.txt").write_text("w")
    for _ in range(3):
        with start_run(cfg, "test-aliases"):
            register_model(d, "alias-test")
    return cfg


def test_parse_ref():
    assert parse_ref("models:/m@prod") == ("m", "prod", None)
    assert parse_ref("models:/m/3") == ("m", None, "3")
    assert parse_ref("/some/dir") is None
    with pytest.raises(ModelError, match="expected models:/NAME/VERSION"):
        parse_ref("models:/m")


def test_promote_rollback_and_resolve(registered):
    cfg = registered
    assert promote("alias-test", "1", "production", cfg.tracking) is None
    r = resolve("models:/alias-test@production", cfg.tracking)
    assert (r.version, r.uri, r.alias) == ("1", "models:/alias-test/1", "production")
    assert r.run_id and r.code_version
    assert promote("alias-test", "3", "production", cfg.tracking) == "1"
    assert promote("alias-test", "2", "production", cfg.tracking) == "3"
    assert rollback("alias-test", "production", cfg.tracking) == ("2", "3")
    assert rollback("alias-test", "production", cfg.tracking) == ("3", "1")
    assert resolve("models:/alias-test@production", cfg.tracking).version == "1"
    with pytest.raises(ModelError, match="no earlier version"):
        rollback("alias-test", "production", cfg.tracking)


def test_unknown_alias_or_version_lists_what_exists(registered):
    cfg = registered
    with pytest.raises(ModelError, match=r"known versions of alias-test: 1, 2, 3"):
        resolve("models:/alias-test@staging", cfg.tracking)
    with pytest.raises(ModelError, match=r"models:/alias-test/9 does not exist"):
        promote("alias-test", "9", "production", cfg.tracking)
    with pytest.raises(ModelError, match="no registered model 'nope'"):
        resolve("models:/nope@production", cfg.tracking)


def test_model_of_the_other_kind_is_refused(registered, tmp_path):
    from meddiff.serving.check import resolve_kind

    cfg = registered
    thor = tmp_path / "thor"
    thor.mkdir()
    (thor / "thor_model.json").write_text("{}")
    with start_run(cfg, "test-kind"):
        register_model(thor, "kind-test")
    assert resolve_kind("anomaly", "models:/kind-test/1", cfg.tracking)["version"] == "1"
    with pytest.raises(ModelError, match="not a model for the synthesis service .*THOR model"):
        resolve_kind("synthesis", "models:/kind-test/1", cfg.tracking)
