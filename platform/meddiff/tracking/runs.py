"""MLflow runs: one per job, with the resolved config, the code version, metrics and artifacts.

A job logs through the :class:`RunLogger` handle that :func:`start_run` yields (a worker builds
one from the run id the driver passes it); no module outside ``meddiff.tracking`` imports mlflow.

The default store is a local SQLite file (``./mlruns.db``) with artifacts under ``./mlartifacts``,
so a laptop needs no server; ``MLFLOW_TRACKING_URI`` or ``tracking.uri`` points at a real one.
On a cluster, use a tracking server every node can reach: a SQLite path is local to one machine.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import meddiff
from meddiff.config import Config, TrackingConfig, config_to_yaml
from meddiff.tracking.server import check_reachable

DEFAULT_DB = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
_checked: set[str] = set()  # server URIs already found reachable in this process


def tracking_uri(cfg: TrackingConfig) -> str:
    """``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlruns.db``."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def configure(cfg: TrackingConfig) -> str:
    """Point MLflow at the store and select (creating if needed) the experiment."""
    import mlflow

    # No usage telemetry leaves the machine (these machines reach no network anyway).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri(cfg)
    if uri not in _checked:
        check_reachable(uri)  # one line in seconds, not MLflow's minutes of silent retries
        _checked.add(uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        artifacts = None
        if uri.startswith("sqlite:///"):
            # Keep artifacts beside the local database rather than in MLflow's cwd-relative default.
            # resolve(): a relative database path (sqlite:///runs/x.db) has no file URI of its own.
            root = Path(uri.removeprefix("sqlite:///")).resolve().parent / DEFAULT_ARTIFACTS
            artifacts = (root / cfg.experiment).as_uri()
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # another process won
            mlflow.create_experiment(cfg.experiment, artifact_location=artifacts)
    mlflow.set_experiment(cfg.experiment)
    return uri


@contextmanager
def start_run(
    cfg: Config,
    job: str,
    *,
    run_name: str | None = None,
    nested: bool = False,
    tags: Mapping[str, str] | None = None,
) -> Iterator[RunLogger]:
    """Open an MLflow run for ``job``, log the resolved config and code version, and yield the
    run's handle.

    On an exception the run is marked FAILED (MLflow does this when the context exits with an
    error), so a crashed job is visible as such in the UI.
    """
    import mlflow

    from meddiff import storage

    storage.configure(cfg.storage)
    uri = configure(cfg.tracking)
    all_tags = {"meddiff.job": job, "meddiff.code_version": code_version(), **(tags or {})}
    # A job started inside another (a demo step, an experiment calling build_prompts) becomes a
    # child run; MLflow refuses a second top-level run while one is active.
    nested = nested or mlflow.active_run() is not None
    with mlflow.start_run(run_name=run_name or job, nested=nested, tags=all_tags) as run:
        log_config(cfg)
        yield RunLogger(uri, run.info.run_id)


def active_run() -> RunLogger | None:
    """The handle of the run this process has open (the innermost :func:`start_run`), if any:
    for code that logs into whatever job called it (a warm-up loss, a worker's run id)."""
    import mlflow

    run = mlflow.active_run()
    return RunLogger(mlflow.get_tracking_uri(), run.info.run_id) if run else None


def log_config(cfg: Config) -> None:
    """Log the config as ``config.yaml`` and as flattened params (searchable in the UI)."""
    import mlflow

    mlflow.log_text(config_to_yaml(cfg), "config.yaml")
    mlflow.log_params(_flatten(cfg.model_dump(mode="json")))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]  # MLflow's param value limit
    return out


def code_version() -> str:
    """``git describe`` of the source tree meddiff was imported from, else the package version."""
    src = Path(meddiff.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=src,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return f"{meddiff.__version__}+git.{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        return meddiff.__version__


class RunLogger:
    """The handle on one MLflow run: everything a job records goes through it, addressed by run
    id (never "whichever run is active", so a handle logs to its own run even while a nested one
    is open).

    :func:`start_run` yields one; another process (a Ray Train worker, a Ray Data actor) builds
    one from the URI the driver resolved (``tracking_uri(cfg.tracking)``, since workers may not
    share the driver's working directory or environment) and the run id. A handle never changes
    the run's status: the process that opened the run owns its lifecycle, so a worker that dies
    and is restarted does not mark the run finished or failed.
    """

    def __init__(self, uri: str, run_id: str):
        import mlflow

        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Parameters as strings (MLflow's 6000-character value limit applies)."""
        from mlflow.entities import Param

        batch = [Param(k, str(v)) for k, v in params.items()]
        self.client.log_batch(self.run_id, params=batch)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Float metrics at ``step`` (0 when None), timestamped now."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """A JSON-serialisable object as the artifact ``artifact_file`` (.json or .yaml)."""
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        """Every file under ``folder``, below ``artifact_path`` in the run's artifacts."""
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_image(self, image: Any, artifact_file: str) -> None:
        """A uint8 image array (H, W) or (H, W, C) as a PNG artifact at ``artifact_file``."""
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_input(
        self,
        path: str | Path,
        context: str,
        name: str | None = None,
        producer_run: str | None = None,
    ) -> dict[str, str]:
        """Record ``path`` as a dataset input of this run (:func:`meddiff.tracking.lineage.
        log_input`); ``producer_run``: the run that wrote it (a shard manifest's run id)."""
        from meddiff.tracking.lineage import log_input

        return log_input(self.client, self.run_id, path, context, name, producer_run)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every logged value of metric ``key``, by step."""
        history = self.client.get_metric_history(self.run_id, key)
        return [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]
