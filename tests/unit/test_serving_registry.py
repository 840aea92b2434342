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


@pytest.fixture
def own_store(tmp_path, mlflow_store):
    """A registry of the test's own; MLflow is pointed back at the session's store after."""
    import mlflow

    yield f"sqlite:///{tmp_path / 'reg.db'}"
    mlflow.set_tracking_uri(mlflow_store)


def test_concurrent_promotions_keep_the_history_exact(tmp_path, own_store):
    """Four `meddiff serve promote` processes at once on one alias (local MLflow store): every
    move is in the history, in the order the moves happened, and rollback goes to the one before
    the last."""
    import os
    import subprocess
    import sys

    import mlflow

    uri = own_store
    cfg = load_config("tiny", overrides=[f"tracking.uri={uri}"])
    d = tmp_path / "m"
    d.mkdir()
    (d / "weights.txt").write_text("w")
    for _ in range(5):
        with start_run(cfg, "test-race"):
            register_model(d, "race")
    promote("race", "1", "production", cfg.tracking)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meddiff.cli",
                "serve",
                "promote",
                "race",
                str(v),
                "--set",
                f"tracking.uri={uri}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for v in (2, 3, 4, 5)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1][-500:] for o in outs]
    moves = {}  # version -> the version it replaced, as each process printed it
    for out, _ in outs:
        line = out.strip().splitlines()[-1]  # models:/race@production: B -> V
        before, after = line.split(": ", 1)[1].split(" -> ")
        moves[after] = before
    tags = mlflow.MlflowClient().get_registered_model("race").tags
    history = tags["meddiff.alias.production.history"].split(",")
    assert history[0] == "1" and sorted(history[1:]) == ["2", "3", "4", "5"], history
    # Each process saw the move before it: the printed chain is the history.
    assert [moves[v] for v in history[1:]] == history[:-1]
    current = resolve("models:/race@production", cfg.tracking).version
    assert current == history[-1]
    assert rollback("race", "production", cfg.tracking) == (history[-1], history[-2])
    assert not any(m.name.startswith("meddiff-lock") for m in
                   mlflow.MlflowClient().search_registered_models())  # fmt: skip


def test_rollback_to_a_deleted_version_is_one_line(registered, tmp_path, capsys):
    import mlflow

    from meddiff.cli import main

    cfg = registered
    (tmp_path / "w.txt").write_text("w")
    for _ in range(3):
        with start_run(cfg, "test-aliases"):
            register_model(tmp_path, "rollback-del")
    for v in ("1", "2", "3"):
        promote("rollback-del", v, "production", cfg.tracking)
    mlflow.MlflowClient().delete_model_version("rollback-del", "2")
    with pytest.raises(ModelError, match=r"the version before 3, 2, was deleted"):
        rollback("rollback-del", "production", cfg.tracking)
    code = main(["serve", "rollback", "rollback-del"])
    err = capsys.readouterr().err
    assert code == 2 and "was deleted from the registry" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_canary_tag_promote_and_end(registered):
    from meddiff.tracking.aliases import canary_of, end_canary, set_canary

    t = registered.tracking
    promote("alias-test", "1", "canary-test", t)
    assert set_canary("alias-test", "2", 25, "canary-test", t) == "1"
    assert canary_of("alias-test", "canary-test", t) == ("2", 25.0)
    with pytest.raises(ModelError, match="already points at 1"):
        set_canary("alias-test", "1", 25, "canary-test", t)
    with pytest.raises(ModelError, match="percent"):
        set_canary("alias-test", "2", 0, "canary-test", t)
    assert end_canary("alias-test", "canary-test", t) == "2"
    assert canary_of("alias-test", "canary-test", t) is None
    set_canary("alias-test", "3", 10, "canary-test", t)
    assert promote("alias-test", "3", "canary-test", t) == "1"  # a promotion ends the canary
    assert canary_of("alias-test", "canary-test", t) is None


def test_moved_artifacts_are_named(tmp_path, own_store):
    import shutil

    from meddiff.serving.runners import load_runner
    from meddiff.tracking import fetch_model

    cfg = load_config("tiny", overrides=[f"tracking.uri={own_store}"])
    d = tmp_path / "m"
    d.mkdir()
    (d / "thor_model.json").write_text("{}")
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)  # the store's default artifact root is ./mlartifacts
    try:
        with start_run(cfg, "test-moved"):
            register_model(d, "moved")
    finally:
        os.chdir(cwd)
    store = next(p for p in tmp_path.rglob("artifacts") if p.is_dir())
    shutil.move(str(store), str(tmp_path / "elsewhere"))
    with pytest.raises(ModelError, match=r"artifacts missing at file://.*artifacts/model"):
        fetch_model("models:/moved/1", cfg.tracking)
    with pytest.raises(ModelError, match="artifacts missing at"):
        load_runner("anomaly", "models:/moved/1", cfg)
