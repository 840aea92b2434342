"""meddiff.tracking is the only MLflow door: no module outside it imports mlflow (issue 23)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "platform" / "meddiff"


def mlflow_imports(source: str) -> list[int]:
    """Line numbers of every ``import mlflow[.x]`` / ``from mlflow[.x] import ...`` in ``source``,
    at any depth (function-local imports included)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
            lines.append(node.lineno)
    return sorted(lines)


def test_the_scan_finds_local_and_from_imports():
    code = "def f():\n    import os, mlflow.pyfunc\n\nfrom mlflow import MlflowClient\nimport mlflowx\n"
    assert mlflow_imports(code) == [2, 4]


def test_only_tracking_imports_mlflow():
    tracking = PACKAGE / "tracking"
    found = [
        f"{path.relative_to(PACKAGE)}:{line}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if tracking not in path.parents
        for line in mlflow_imports(path.read_text())
    ]
    assert not found, f"import mlflow outside meddiff.tracking (use its run handle): {found}"


def test_a_run_handle_logs_to_its_own_run_while_a_nested_one_is_open(tiny_cfg, tmp_path):
    import mlflow

    from meddiff import tracking

    data = tmp_path / "inputs"
    data.mkdir()
    (data / "a.txt").write_text("x")
    assert tracking.active_run() is None
    with tracking.start_run(tiny_cfg, "test-handle") as outer:
        with tracking.start_run(tiny_cfg, "test-handle-child") as inner:
            assert tracking.active_run().run_id == inner.run_id != outer.run_id
            outer.log_params({"where": "outer", "n": 3})
            outer.log_metrics({"loss": 0.5}, step=2)
            outer.log_metrics({"loss": 0.7}, step=1)
            outer.set_tags({"meddiff.test": "yes"})
            outer.log_dict({"k": 1}, "summary.json")
            outer.log_artifacts(data, "inputs")
            tags = outer.log_input(data, context="training", producer_run=inner.run_id)
        assert tracking.active_run().run_id == outer.run_id
    assert tracking.active_run() is None
    client = mlflow.MlflowClient()
    got = client.get_run(outer.run_id)
    assert got.data.params["where"] == "outer" and got.data.params["n"] == "3"
    assert got.data.tags["meddiff.test"] == "yes"
    assert "where" not in client.get_run(inner.run_id).data.params
    assert outer.metric_history("loss") == [(1, 0.7), (2, 0.5)]
    assert {a.path for a in client.list_artifacts(outer.run_id)} >= {"summary.json", "inputs"}
    (dataset,) = got.inputs.dataset_inputs
    input_tags = {t.key: t.value for t in dataset.tags}
    assert input_tags["meddiff.producer_run"] == inner.run_id == tags["meddiff.producer_run"]
    assert input_tags["mlflow.data.context"] == "training"
    assert input_tags["meddiff.digest"] == tags["digest"]


def test_a_relative_sqlite_store_keeps_its_artifacts_beside_it(tmp_path, monkeypatch):
    """``--set tracking.uri=sqlite:///runs/x.db`` (relative to the working directory) used to
    fail with 'relative path can't be expressed as a file URI'."""
    import mlflow

    from meddiff.config import TrackingConfig
    from meddiff.tracking.runs import configure

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    before = mlflow.get_tracking_uri()
    try:
        uri = configure(TrackingConfig(uri="sqlite:///runs/x.db", experiment="relative"))
        assert uri == "sqlite:///runs/x.db" and (tmp_path / "runs" / "x.db").is_file()
        where = mlflow.get_experiment_by_name("relative").artifact_location
        assert where == (tmp_path / "runs" / "mlartifacts" / "relative").as_uri()
    finally:
        mlflow.set_tracking_uri(before)  # the later tests' store, not this working directory's
